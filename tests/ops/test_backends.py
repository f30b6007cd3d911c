"""Every backend against the dense reference, plus oracles that hold for any correct implementation."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import stochastic_attention as sa
from stochastic_attention.ops import blocked
from stochastic_attention.ops.patterns import dense_mask, pattern_edges
from stochastic_attention.testing import assert_matches_reference, outputs_and_grads, random_key_mask, random_qkv

LENGTHS = (1, 7, 63, 130, 257)


def on(backend, fn=sa.stochastic_attention):
    return partial(fn, backend=backend)


def assert_close(a, b, atol, rtol=0.0):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


CASES = list(itertools.product(LENGTHS, (True, False), ("band", "block"), (0, 3), (False, True)))


@pytest.mark.parametrize("n,causal,layout,sinks,pad", CASES)
def test_blocked_matches_reference_sa(n, causal, layout, sinks, pad, device):
    q, k, v = random_qkv(n, device=device)
    kpm = random_key_mask(2, n, device=device) if pad else None
    perm = sa.random_permutation(2, 4, n, generator=torch.Generator().manual_seed(n)).to(device)
    kw = dict(window=8, perm=perm, causal=causal, layout=layout, sinks=sinks, key_mask=kpm)
    assert_matches_reference(on("blocked"), on("reference"), (q, k, v), **kw)


@pytest.mark.parametrize("n,causal,sinks,pad", list(itertools.product(LENGTHS, (True, False), (0, 3), (False, True))))
def test_blocked_matches_reference_swa(n, causal, sinks, pad, device):
    q, k, v = random_qkv(n, device=device)
    kpm = random_key_mask(2, n, device=device) if pad else None
    kw = dict(window=8, causal=causal, sinks=sinks, key_mask=kpm)
    swa = sa.sliding_window_attention
    assert_matches_reference(on("blocked", swa), on("reference", swa), (q, k, v), **kw)


@pytest.mark.parametrize("perm_shape", ["seq", "batch", "batch_heads"])
@pytest.mark.parametrize("window", [1, 2, 16, 129, 300])
def test_perm_shapes_and_windows(perm_shape, window, device):
    n = 130
    q, k, v = random_qkv(n, batch=3, heads=6, kv_heads=3, device=device)
    g = torch.Generator().manual_seed(window)
    shape = {"seq": (n,), "batch": (3, n), "batch_heads": (3, 6, n)}[perm_shape]
    perm = torch.rand(*shape, generator=g).argsort(-1).to(device)
    for layout in ("band", "block"):
        kw = dict(window=window, perm=perm, layout=layout, sinks=2)
        assert_matches_reference(on("blocked"), on("reference"), (q, k, v), **kw)


@pytest.mark.parametrize("fn", ["sa_band", "sa_block", "swa"])
def test_bf16_matches_fp32_reference(fn, device):
    n = 130
    q, k, v = random_qkv(n, dtype=torch.bfloat16, device=device)
    kpm = random_key_mask(2, n, device=device)
    perm = sa.random_permutation(2, 4, n, generator=torch.Generator().manual_seed(1)).to(device)
    if fn == "swa":
        call = lambda *a, **kw: sa.sliding_window_attention(*a, 16, sinks=2, key_mask=kpm, **kw)
    else:
        layout = fn.split("_")[1]
        call = lambda *a, **kw: sa.stochastic_attention(*a, 16, perm=perm, layout=layout, sinks=2,
                                                        key_mask=kpm, **kw)
    out = assert_matches_reference(
        partial(call, backend="blocked"),
        lambda *qkv: call(*(t.float() for t in qkv), backend="reference"),  # fp32 from the same numbers
        (q, k, v), atol=3e-2, rtol=3e-2, grad_atol=1e-1, grad_rtol=5e-2)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("layout,sinks,pad", [("band", 0, False), ("band", 3, True), ("block", 0, False),
                                              ("block", 200, True)])
def test_flex_cpu_inference_matches_reference(layout, sinks, pad):
    n = 257
    q, k, v = random_qkv(n, grad=False)
    kpm = random_key_mask(2, n) if pad else None
    perm = sa.random_permutation(2, 4, n, generator=torch.Generator().manual_seed(3))
    kw = dict(window=40, perm=perm, layout=layout, sinks=sinks, key_mask=kpm)
    with torch.no_grad():
        ref = sa.stochastic_attention(q, k, v, backend="reference", **kw)
        out = sa.stochastic_attention(q, k, v, backend="flex", **kw)
    assert_close(out, ref, 1e-5)


def test_flex_cpu_inference_takes_inputs_that_require_grad():
    """Under no_grad, q/k/v that require grad (a model's activations) must not make the CPU
    FlexAttention kernel build a backward it does not have."""
    q, k, v = random_qkv(70)
    with torch.no_grad():
        ref = sa.sliding_window_attention(q, k, v, 16, backend="reference")
        out = sa.sliding_window_attention(q, k, v, 16, backend="flex")
    assert_close(out, ref, 1e-5)


def test_flex_cpu_refuses_backward_with_a_clear_error():
    q, k, v = random_qkv(16)
    with pytest.raises(ValueError, match="backend='flex'.*blocked"):
        sa.stochastic_attention(q, k, v, 4, backend="flex")


# ---- oracles -------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_identity_perm_is_swa(causal):
    n = 130
    q, k, v = random_qkv(n, grad=False)
    kpm = random_key_mask(2, n)
    ident = torch.arange(n)
    got = sa.stochastic_attention(q, k, v, 16, perm=ident, causal=causal, sinks=2, key_mask=kpm)
    want = sa.sliding_window_attention(q, k, v, 16, causal=causal, sinks=2, key_mask=kpm)
    assert_close(got, want, 1e-6)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("causal", [True, False])
def test_window_covering_sequence_is_full_attention(backend, causal):
    n = 63
    q, k, v = random_qkv(n, grad=False)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          is_causal=causal)
    for layout in ("band", "block"):
        got = sa.stochastic_attention(q, k, v, n, layout=layout, causal=causal, backend=backend)
        assert_close(got, full, 1e-5)
    assert_close(sa.sliding_window_attention(q, k, v, 10 * n, causal=causal, backend=backend), full, 1e-5)


@pytest.mark.parametrize("method", ["swa", "sa_band", "sa_block"])
@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_no_future_leak(method, backend):
    n, t = 130, 70
    q, k, v = random_qkv(n, grad=False)
    perm = sa.random_permutation(2, 4, n, generator=torch.Generator().manual_seed(5))

    def call(q, k, v):
        if method == "swa":
            return sa.sliding_window_attention(q, k, v, 16, sinks=2, backend=backend)
        return sa.stochastic_attention(q, k, v, 16, perm=perm, layout=method[3:], sinks=2, backend=backend)

    base = call(q, k, v)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:])
    changed = call(q2, k2, v2)
    assert_close(changed[:, :, : t + 1], base[:, :, : t + 1], 0.0)
    assert not torch.allclose(changed[:, :, t + 1:], base[:, :, t + 1:])  # the test can fail


def test_same_seed_same_output_different_seed_different_output():
    q, k, v = random_qkv(257, grad=False)

    def call(seed):
        return sa.stochastic_attention(q, k, v, 16, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(call(0), call(0))
    assert not torch.allclose(call(0), call(1))


def test_block_layout_tiles_are_dense():
    """After sorting each group by position, every group's causal mask is a full lower triangle."""
    n, w = 257, 16
    perm = blocked.sort_groups(sa.random_permutation(1, 1, n, generator=torch.Generator().manual_seed(0)), w)
    mask = dense_mask(n, w, perm=perm, layout="block")[0, 0]
    slots = perm[0, 0]
    for start in range(0, n, w):
        group = slots[start:start + w]
        tile = mask[group][:, group]  # rows/cols in slot order within the group
        assert torch.equal(tile, torch.ones_like(tile).tril())
    # and nothing outside the groups is visible
    assert int(mask.sum()) == sum(m * (m + 1) // 2 for m in [w] * (n // w) + [n % w])


@pytest.mark.parametrize("layout", ["band", "block"])
@pytest.mark.parametrize("causal", [True, False])
def test_sparse_pattern_equals_dense_mask(layout, causal):
    n = 130
    perm = sa.random_permutation(1, 1, n, generator=torch.Generator().manual_seed(2))[0, 0]
    key_valid = random_key_mask(1, n)[0]
    qi, ki = pattern_edges(n, 16, perm=perm, layout=layout, causal=causal, sinks=3, key_valid=key_valid)
    sparse = torch.zeros(n, n, dtype=torch.bool)
    sparse[qi, ki] = True
    assert len(qi) == int(sparse.sum())  # each edge once
    dense = dense_mask(n, 16, perm=perm.view(1, 1, n), layout=layout, causal=causal, sinks=3,
                       key_mask=key_valid[None])[0, 0]
    assert torch.equal(sparse, dense)


def test_attended_keys():
    n, w = 257, 16
    swa = sa.attended_keys(n, w, method="sliding_window")
    assert torch.equal(swa[0, 0], torch.clamp(torch.arange(n) + 1, max=w))
    full = sa.attended_keys(n, w, method="full")
    assert torch.equal(full[0, 0], torch.arange(n) + 1)
    perm = sa.random_permutation(2, 3, n, generator=torch.Generator().manual_seed(0))
    kpm = random_key_mask(2, n)
    for layout in ("band", "block"):
        got = sa.attended_keys(n, w, perm=perm, layout=layout, sinks=4, key_mask=kpm)
        want = dense_mask(n, w, perm=perm, layout=layout, sinks=4, key_mask=kpm).sum(-1)
        assert torch.equal(got, want)
    # causal SA sees about (w - 1) * i / n + 1 keys at position i on average
    many = sa.attended_keys(n, w, generator=torch.Generator().manual_seed(1), batch=8, heads=8)
    mean = many.float().mean().item()
    assert abs(mean - ((w - 1) / 2 + 1)) < 0.5


def test_random_permutation():
    p = sa.random_permutation(3, 2, 50, generator=torch.Generator().manual_seed(0))
    assert p.shape == (3, 2, 50) and p.dtype == torch.long
    assert torch.equal(p.sort(-1).values, torch.arange(50).expand(3, 2, 50))
    assert torch.equal(p, sa.random_permutation(3, 2, 50, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(p[0, 0], p[0, 1])  # independent per head


# ---- bad input -----------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(10, grad=False)
    with pytest.raises(ValueError, match="window must be >= 1"):
        sa.stochastic_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="window must be an int"):
        sa.sliding_window_attention(q, k, v, 2.5)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        sa.sliding_window_attention(q, k, v, 4, sinks=-1)
    with pytest.raises(ValueError, match="layout must be one of"):
        sa.stochastic_attention(q, k, v, 4, layout="diagonal")
    with pytest.raises(ValueError, match="backend must be one of"):
        sa.stochastic_attention(q, k, v, 4, backend="triton")
    with pytest.raises(ValueError, match="not a permutation"):
        sa.stochastic_attention(q, k, v, 4, perm=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="perm has length 9"):
        sa.stochastic_attention(q, k, v, 4, perm=torch.arange(9))
    with pytest.raises(TypeError, match="perm must be an integer tensor"):
        sa.stochastic_attention(q, k, v, 4, perm=torch.arange(10).float())
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        sa.sliding_window_attention(q[:, :3], k, v, 4)
    with pytest.raises(ValueError, match="4 dims"):
        sa.sliding_window_attention(q[0], k, v, 4)
    with pytest.raises(ValueError, match="same sequence length"):
        sa.sliding_window_attention(q, k[:, :, :5], v[:, :, :5], 4)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        sa.sliding_window_attention(q, k, v[..., :8], 4)
    with pytest.raises(TypeError, match="key_mask must be a bool"):
        sa.sliding_window_attention(q, k, v, 4, key_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="key_mask must have shape"):
        sa.sliding_window_attention(q, k, v, 4, key_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="share one dtype"):
        sa.sliding_window_attention(q, k.double(), v.double(), 4)
    with pytest.raises(ValueError, match="method must be one of"):
        sa.attended_keys(10, 4, method="moba-ish")


def test_empty_and_fully_padded_rows_are_zero_not_nan():
    q, k, v = random_qkv(7)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 3] = True
    for backend in ("reference", "blocked"):
        out, grads = outputs_and_grads(sa.stochastic_attention, (q, k, v), window=2, key_mask=kpm,
                                       backend=backend, generator=torch.Generator().manual_seed(0))
        assert torch.all(out[0] == 0)
        assert all(torch.isfinite(g).all() for g in grads)
    empty = sa.stochastic_attention(*(t[:, :, :0] for t in (q, k, v)), 4)
    assert empty.shape == (2, 4, 0, 16)


@pytest.mark.parametrize("tile", [1, 5])
def test_tiny_ragged_tiles_match_reference(monkeypatch, tile, device):
    """Many tiles and a ragged last one, whatever the tile size is tuned to."""
    monkeypatch.setattr(blocked, "BAND_TILE", tile)
    n = 37
    q, k, v = random_qkv(n, device=device)
    kpm = random_key_mask(2, n, device=device)
    perm = sa.random_permutation(2, 4, n, generator=torch.Generator().manual_seed(tile)).to(device)
    for causal in (True, False):
        kw = dict(window=6, perm=perm, causal=causal, sinks=2, key_mask=kpm)
        assert_matches_reference(on("blocked"), on("reference"), (q, k, v), **kw)


# The dispatch on a GPU, tested here as a function of facts (device type, gradients, local).
@pytest.mark.parametrize(("device_type", "needs_grad", "local", "expected"), [
    ("cuda", True, 0, "flex"),      # GPU training: FlexAttention forward and backward
    ("cuda", False, 0, "flex"),
    ("cuda", True, 3, "blocked"),   # the SA + local union is the blocked backend's only
    ("cpu", False, 0, "blocked"),   # CPU: the blocked backend (and its flash path)
    ("cpu", True, 0, "blocked"),
])
def test_auto_chooses_flex_on_cuda_only(device_type, needs_grad, local, expected):
    from stochastic_attention.functional import choose_backend

    assert choose_backend("auto", device_type=device_type, needs_grad=needs_grad,
                          local=local, flex_available=True) == expected
    # a PyTorch without FlexAttention falls back to the blocked backend everywhere
    assert choose_backend("auto", device_type=device_type, needs_grad=needs_grad,
                          local=local, flex_available=False) == "blocked"


def test_flex_is_refused_where_it_cannot_run_and_says_why():
    from stochastic_attention.functional import choose_backend

    assert choose_backend("flex", device_type="cuda", needs_grad=True,
                          flex_available=True) == "flex"
    assert choose_backend("flex", device_type="cpu", needs_grad=False,
                          flex_available=True) == "flex"
    with pytest.raises(ValueError, match="no FlexAttention backward on CPU"):
        choose_backend("flex", device_type="cpu", needs_grad=True, flex_available=True)
    with pytest.raises(ValueError, match="does not run on device 'mps'"):
        choose_backend("flex", device_type="mps", needs_grad=False, flex_available=True)
    with pytest.raises(ValueError, match="not available in this PyTorch"):
        choose_backend("flex", device_type="cuda", needs_grad=False, flex_available=False)
    with pytest.raises(ValueError, match="does not serve local"):
        choose_backend("flex", device_type="cuda", needs_grad=False, local=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("triton", device_type="cuda", needs_grad=False)
