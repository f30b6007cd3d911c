"""The chunked flash-kernel path (ops/flashband.py) against the dense reference.

Tiles and chunks are shrunk so that short sequences cross many chunk boundaries, edge chunks
(key runs leaving the sequence at both ends) and ragged last tiles.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import stochastic_attention as sa
from stochastic_attention.ops import blocked, dense, flashband, reference

SCALE = 0.3


@pytest.fixture(params=[(32, 128, 2048, 1024), (5, 7, 15, 18), (3, 4, 3, 4)],
                ids=["default", "small", "one-tile-chunks"])
def tiles(request, monkeypatch):
    fwd_tile, bwd_tile, fwd_chunk, bwd_chunk = request.param
    monkeypatch.setattr(flashband, "FORWARD_TILE", fwd_tile)
    monkeypatch.setattr(flashband, "BACKWARD_TILE", bwd_tile)
    monkeypatch.setattr(flashband, "FORWARD_CHUNK", fwd_chunk)
    monkeypatch.setattr(flashband, "BACKWARD_CHUNK", bwd_chunk)
    return request.param


def make(n, *, batch=2, heads=4, kv_heads=2, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, dim, generator=g).to(dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def grads(out, q, k, v):
    return torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v))


def perm_of(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"swa": None, "shared": sa.random_permutation(1, 1, n, generator=g),
            "per-sample": sa.random_permutation(2, 1, n, generator=g),
            "per-head": sa.random_permutation(2, 4, n, generator=g)}[kind]


def assert_matches(out, ref, q, k, v):
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(grads(out, q, k, v), grads(ref, q, k, v)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


CASES = [c for c in itertools.product((1, 9, 131), (1, 8, 33), ("band", "block"), (True, False),
                                      ("swa", "shared", "per-sample", "per-head"))
         if c[1] < c[0] and not (c[4] == "swa" and c[2] == "block")]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("n,window,layout,causal,order", CASES)
def test_window_part_matches_reference(tiles, n, window, layout, causal, order, kv_heads):
    q, k, v = make(n, kv_heads=kv_heads)
    perm = perm_of(order, n, n + window)
    ref = reference.attention(q, k, v, window, perm=perm, layout=layout, causal=causal, sinks=0,
                              key_mask=None, scale=SCALE, local=0)
    if perm is not None and layout == "block":
        perm = blocked.sort_groups(perm, window)
    out = flashband.attention(q, k, v, [flashband.WindowPart(window, layout, causal, perm)], SCALE)
    assert_matches(out, ref, q, k, v)


@pytest.mark.parametrize("sinks", [1, 4])
@pytest.mark.parametrize("n,window,layout,causal,order", [
    c for c in itertools.product((9, 131), (1, 33), ("band", "block"), (True, False),
                                 ("swa", "per-sample", "per-head"))
    if c[1] < c[0] and not (c[4] == "swa" and c[2] == "block")])
def test_sinks_as_a_part_of_their_own(tiles, n, window, layout, causal, order, sinks):
    """The first ``sinks`` positions, seen by every (later) query and hidden from the window
    parts: each key once, rows whose window holds only sinks included (GQA)."""
    q, k, v = make(n, kv_heads=2)
    perm = perm_of(order, n, n + window + sinks)
    ref = reference.attention(q, k, v, window, perm=perm, layout=layout, causal=causal,
                              sinks=sinks, key_mask=None, scale=SCALE, local=0)
    out = flashband.windowed(q, k, v, window, perm=perm, layout=layout, causal=causal, scale=SCALE,
                             sinks=sinks)
    assert_matches(out, ref, q, k, v)


@pytest.mark.parametrize("sinks", [1, 4])
@pytest.mark.parametrize("layout,order", [("band", "shared"), ("band", "per-head"),
                                          ("block", "per-sample")])
def test_union_with_sinks(tiles, layout, order, sinks):
    n, window, local = 70, 17, 5
    q, k, v = make(n, kv_heads=2)
    perm = perm_of(order, n, 9)
    ref = reference.attention(q, k, v, window, perm=perm, layout=layout, causal=True, sinks=sinks,
                              key_mask=None, scale=SCALE, local=local)
    out = flashband.union(q, k, v, window, perm=perm, layout=layout, local=local, scale=SCALE,
                          sinks=sinks)
    assert_matches(out, ref, q, k, v)


@pytest.mark.parametrize("heads_per_call", [1, 3])
@pytest.mark.parametrize("layout,causal,local", [("band", True, 0), ("band", False, 0),
                                                 ("block", True, 0), ("band", True, 5)])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_per_head_orders_in_head_groups(tiles, heads_per_call, layout, causal, local, kv_heads,
                                        monkeypatch):
    """A permutation per head: the forward sends the heads to the kernel in groups (here of one,
    and of three: the second group starts inside a GQA group), outputs and gradients unchanged."""
    n, window = 61, 9
    q, k, v = make(n, kv_heads=kv_heads)
    perm = perm_of("per-head", n, 3)
    part = flashband.WindowPart(window, layout, causal, perm)
    tiling = flashband._Tiling.make(part, n, flashband.FORWARD_TILE)
    plane = 2 * tiling.L * min(flashband.FORWARD_CHUNK, n) * q.element_size()  # 2 samples
    monkeypatch.setattr(flashband, "MASK_BYTES", heads_per_call * plane)
    groups = flashband._orders(part, tiling, 2, 4, flashband.FORWARD_CHUNK, q, split_heads=True)
    assert [o.H for o in groups] == ([1, 1, 1, 1] if heads_per_call == 1 else [3, 1])
    ref = reference.attention(q, k, v, window, perm=perm, layout=layout, causal=causal, sinks=0,
                              key_mask=None, scale=SCALE, local=local)
    if local:
        out = flashband.union(q, k, v, window, perm=perm, layout=layout, local=local, scale=SCALE)
    else:
        part_perm = blocked.sort_groups(perm, window) if layout == "block" else perm
        out = flashband.attention(q, k, v, [flashband.WindowPart(window, layout, causal, part_perm)],
                                  SCALE)
    assert_matches(out, ref, q, k, v)


@pytest.mark.parametrize("n,window,local,layout,order", [
    c for c in itertools.product((9, 131), (1, 33), (1, 17), ("band", "block"),
                                 ("shared", "per-sample", "per-head")) if max(c[1], c[2]) < c[0]])
def test_union_matches_reference(tiles, n, window, local, layout, order):
    """Two parts merged by log-sum-exp, rows with no key in the SA part included."""
    q, k, v = make(n, kv_heads=4 if order == "shared" else 2)
    perm = perm_of(order, n, n + window + local)
    ref = reference.attention(q, k, v, window, perm=perm, layout=layout, causal=True, sinks=0,
                              key_mask=None, scale=SCALE, local=local)
    out = flashband.union(q, k, v, window, perm=perm, layout=layout, local=local, scale=SCALE)
    assert_matches(out, ref, q, k, v)


@pytest.mark.parametrize("window,tile", [(20, 32), (100, 64), (150, 128)])
@pytest.mark.parametrize("order", ["swa", "per-sample"])
def test_backward_tile_follows_the_window(window, tile, order):
    """The backward's band tile grows with the window (:func:`flashband.backward_tile`); every
    size, ragged last tile included, gives the reference's gradients."""
    assert flashband.backward_tile(window) == tile
    n = 301
    q, k, v = make(n, batch=1, heads=2, kv_heads=1)
    perm = None if order == "swa" else sa.random_permutation(1, 1, n,
                                                             generator=torch.Generator().manual_seed(1))
    ref = reference.attention(q, k, v, window, perm=perm, layout="band", causal=True, sinks=0,
                              key_mask=None, scale=SCALE, local=0)
    out = flashband.attention(q, k, v, [flashband.WindowPart(window, "band", True, perm)], SCALE)
    assert_matches(out, ref, q, k, v)


def laid_out(q, k, v, layout):
    """q, k, v (leaves) as the operator would get them in ``layout``; returns (leaves, inputs):
    - "bnhd": transposed views of [B, n, H, D] tensors, as a model's projections give them;
    - "fused": slices of one [B, n, (H + 2 Hkv) D] projection (not dense, offset rows);
    - "expanded": k and v one head expanded over the key/value heads (stride 0);
    - "strided-dim": the last dim not contiguous (the operator copies these)."""
    if layout == "bnhd":
        leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
        return leaves, [x.transpose(1, 2) for x in leaves]
    if layout == "fused":
        B, n, D = q.shape[0], q.shape[2], q.shape[3]
        fused = torch.cat([x.detach().transpose(1, 2).reshape(B, n, -1) for x in (q, k, v)], -1)
        fused.requires_grad_()
        sizes = [x.shape[1] * D for x in (q, k, v)]
        views = [part.view(B, n, -1, D).transpose(1, 2) for part in fused.split(sizes, -1)]
        return [fused], views
    if layout == "expanded":
        leaves = [q.detach().requires_grad_(), *(x.detach()[:, :1].clone().requires_grad_()
                                                  for x in (k, v))]
        return leaves, [leaves[0], *(x.expand_as(k) for x in leaves[1:])]
    leaves = [x.detach().transpose(-1, -2).contiguous().requires_grad_() for x in (q, k, v)]
    return leaves, [x.transpose(-1, -2) for x in leaves]


@pytest.mark.parametrize("layout", ["bnhd", "fused", "expanded", "strided-dim"])
@pytest.mark.parametrize("method", ["swa", "band", "block", "per-head", "union", "union-block"])
def test_inputs_in_any_row_layout(tiles, layout, method):
    """q, k, v in a model's layouts give what contiguous copies of them give (outputs and
    gradients); the row-addressable ones are read in place, and the output takes q's layout when
    q is dense."""
    n, window, local = 47, 9, 4 if method.startswith("union") else 0
    perm = None if method == "swa" else perm_of("per-head" if method == "per-head" else "per-sample",
                                                  n, 5)
    part_layout = "block" if method in ("block", "union-block") else "band"
    leaves, inputs = laid_out(*make(n, kv_heads=2), layout)
    for x in inputs:
        assert (flashband.addressable(x) is x) == (layout != "strided-dim")

    def run(q, k, v):
        if local:
            return flashband.union(q, k, v, window, perm=perm, layout=part_layout, local=local,
                                   scale=SCALE)
        p = blocked.sort_groups(perm, window) if perm is not None and part_layout == "block" else perm
        return flashband.attention(q, k, v, [flashband.WindowPart(window, part_layout, True, p)],
                                   SCALE)

    expected = run(*(x.contiguous() for x in inputs))
    out = run(*inputs)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    if layout in ("bnhd", "expanded"):
        assert out.stride() == inputs[0].stride()  # bnhd: out.transpose(1, 2).reshape(B, n, -1) is a view
    weight = torch.cos(expected.detach())
    want = torch.autograd.grad((expected * weight).sum(), leaves)
    got = torch.autograd.grad((out * weight).sum(), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_is_close_to_the_fp64_reference(tiles, dtype):
    q, k, v = make(70, dtype=torch.float64)
    perm = perm_of("shared", 70, 0)
    ref = reference.attention(q, k, v, 9, perm=perm, layout="band", causal=True, sinks=0,
                              key_mask=None, scale=SCALE, local=4)
    ref_g = grads(ref, q, k, v)
    low = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = flashband.union(*low, 9, perm=perm, layout="band", local=4, scale=SCALE)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for a, b in zip(grads(out.float(), *low), ref_g):
        torch.testing.assert_close(a.double(), b, atol=5 * tol, rtol=5 * tol)


def test_gradcheck_through_the_kernel(monkeypatch):
    monkeypatch.setattr(flashband, "FORWARD_TILE", 3)
    monkeypatch.setattr(flashband, "BACKWARD_TILE", 4)
    monkeypatch.setattr(flashband, "FORWARD_CHUNK", 6)
    monkeypatch.setattr(flashband, "BACKWARD_CHUNK", 8)
    q, k, v = make(11, batch=1, heads=2, kv_heads=1, dim=3)
    perm = perm_of("per-head", 11, 3)[:1, :2]
    fn = lambda q, k, v: flashband.union(q, k, v, 4, perm=perm, layout="band", local=2, scale=SCALE)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    fn = lambda q, k, v: flashband.windowed(q, k, v, 4, perm=None, layout="band", causal=False,  # noqa: E731
                                            scale=SCALE)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dispatcher_routes_plain_calls_here_and_the_rest_to_the_selecting_path(monkeypatch):
    """Padding and non-finite keys keep the blocked path that selects hidden keys; so do the
    block layout in training and a union with a band of a few keys, where it is faster. Sinks
    come here (a part of their own)."""
    calls = []
    real = flashband.attention
    monkeypatch.setattr(flashband, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make(40, dtype=torch.float32)
    sa.sliding_window_attention(q, k, v, 5)
    sa.stochastic_attention(q, k, v, 5)
    sa.stochastic_attention(q, k, v, 16, local=3)
    with torch.no_grad():
        sa.stochastic_attention(q, k, v, 5, layout="block")
    sa.stochastic_attention(q, k, v, 5, sinks=2)
    sa.sliding_window_attention(q, k, v, 5, sinks=4)
    sa.stochastic_attention(q, k, v, 16, local=3, sinks=4)
    assert len(calls) == 7
    sa.stochastic_attention(q, k, v, 5, layout="block")
    sa.stochastic_attention(q, k, v, 5, local=3)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :4] = False
    sa.sliding_window_attention(q, k, v, 5, key_mask=mask)
    sa.stochastic_attention(q, k, v, 5, sinks=2, key_mask=mask)
    bad = k.detach().clone()
    bad[0, 0, 3, 0] = float("nan")
    sa.sliding_window_attention(q, bad, v, 5)
    assert len(calls) == 7


def test_all_finite_sees_every_kind_of_non_finite_entry():
    x = torch.randn(4, 5)
    assert dense.all_finite(x)
    for value in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 3] = value
        assert not dense.all_finite(y)
    both = x.clone()
    both[0, 0], both[1, 1] = float("inf"), float("-inf")
    assert not dense.all_finite(both)
    assert dense.all_finite(torch.full((3,), 60000.0, dtype=torch.float16))  # sums in fp32
