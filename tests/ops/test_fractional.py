"""Fractional Neural Attention: the dense reference against its definition, the fast backends
against the reference (outputs and gradients), and the windowed kernel against SWA / SA."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import stochastic_attention as sa
from stochastic_attention.ops import blocked, fractional
from stochastic_attention.ops.patterns import dense_mask
from stochastic_attention.testing import assert_matches_reference

ALPHAS = (0.5, 1.2, 2.0)
FLOAT64_TOL = dict(atol=1e-7, grad_atol=1e-7, rtol=1e-7)  # torch.testing.assert_close's defaults


def _qkv(B, Hq, Hkv, n, D, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g, dtype=dtype).to(device) for h in (Hq, Hkv, Hkv))


def _padding(B, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, n, generator=g) > 0.3
    mask[0] = False  # a sequence with no real token: every row must be zeros, not NaN
    return mask


@pytest.fixture
def small_tiles(monkeypatch):
    """Several chunks / tiles even at short test lengths, with a ragged last one."""
    monkeypatch.setattr(fractional, "QUERY_CHUNK", 7)
    monkeypatch.setattr(blocked, "BAND_TILE", 5)


def test_alpha_two_is_softmax_of_shifted_dot_products():
    q, k, v = _qkv(2, 3, 3, 11, 8)
    s = 1.7
    out = sa.fractional_attention(q, k, v, 2.0, scale=s, backend="reference")
    logits = 2 * q @ k.transpose(-1, -2) / s**2 - (k * k).sum(-1)[..., None, :] / s**2
    expected = torch.softmax(logits, dim=-1) @ v
    torch.testing.assert_close(out, expected)
    fast = sa.fractional_attention(q, k, v, 2.0, scale=s, backend="chunked")
    torch.testing.assert_close(fast, expected)


def test_reference_matches_the_kernel_formula_elementwise():
    q, k, _ = _qkv(1, 1, 1, 5, 4)
    s, eps, alpha = 2.0, 0.5, 1.2
    P = sa.fractional_weights(q, k, alpha, eps=eps, scale=s)
    dist = torch.cdist(q[0, 0], k[0, 0]) / s
    kern = (1 + dist / math.sqrt(eps)) ** -(4 + alpha)
    torch.testing.assert_close(P[0, 0], kern / kern.sum(-1, keepdim=True))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_rows_sum_to_one_and_masked_keys_get_zero_weight(alpha):
    B, H, n = 3, 2, 13
    q, k, _ = _qkv(B, H, H, n, 6)
    pad = _padding(B, n)
    P = sa.fractional_weights(q, k, alpha, causal=True, key_mask=pad)
    visible = dense_mask(n, n, causal=True, key_mask=pad)
    assert torch.all(P[~visible.expand_as(P)] == 0)
    row_sums = P.sum(-1)
    has_key = visible.expand_as(P).any(-1)
    torch.testing.assert_close(row_sums[has_key], torch.ones_like(row_sums[has_key]))
    assert torch.all(row_sums[~has_key] == 0) and (~has_key).any()
    assert torch.all(P[has_key.unsqueeze(-1).expand_as(P) & visible.expand_as(P)] > 0)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_equals_reference_outputs_and_gradients(small_tiles, alpha, causal, device):
    B, Hq, Hkv, n, D = 2, 4, 2, 19, 5  # GQA, odd length, ragged last chunk
    q, k, v = (t.requires_grad_() for t in _qkv(B, Hq, Hkv, n, D, device=device))
    pad = _padding(B, n).to(device)
    kw = dict(alpha=alpha, causal=causal, key_mask=pad, scale=1.3)
    # assert_close fails on NaN: NaN outputs or gradients (a row without keys) cannot pass
    fast = assert_matches_reference(partial(sa.fractional_attention, backend="chunked"),
                                    partial(sa.fractional_attention, backend="reference"), (q, k, v),
                                    **kw, **FLOAT64_TOL)
    assert not torch.isnan(fast).any() and torch.all(fast[0] == 0)


@pytest.mark.parametrize("alpha", (1.2, 2.0))
@pytest.mark.parametrize("layout", ["band", "block"])
@pytest.mark.parametrize("causal", [False, True])
def test_windowed_equals_reference_with_the_same_mask(small_tiles, alpha, layout, causal, device):
    B, Hq, Hkv, n, D, w = 2, 4, 2, 23, 6, 6
    q, k, v = (t.requires_grad_() for t in _qkv(B, Hq, Hkv, n, D, seed=3, device=device))
    pad = _padding(B, n).to(device)
    perm = sa.random_permutation(B, Hq, n, generator=torch.Generator().manual_seed(5)).to(device)
    kw = dict(causal=causal, key_mask=pad, window=w, perm=perm, layout=layout)
    fast = assert_matches_reference(partial(sa.fractional_attention, backend="blocked"),
                                    partial(sa.fractional_attention, backend="reference"), (q, k, v),
                                    alpha=alpha, **kw, **FLOAT64_TOL)
    # The window really restricts attention: the result differs from full FNA.
    full = sa.fractional_attention(q, k, v, alpha, causal=causal, key_mask=pad)
    assert not torch.allclose(fast, full)


@pytest.mark.parametrize("perm_given", [False, True])
def test_window_covering_the_sequence_is_dense_fna(small_tiles, perm_given):
    B, H, n, D = 2, 2, 17, 4
    q, k, v = _qkv(B, H, H, n, D, seed=4)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)) if perm_given else None
    dense = sa.fractional_attention(q, k, v, 1.2, backend="reference")
    for window in (n, n + 5):
        for backend in ("auto", "blocked", "reference"):
            out = sa.fractional_attention(q, k, v, 1.2, window=window, perm=perm, backend=backend)
            torch.testing.assert_close(out, dense)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_tiny_windows_equal_reference(small_tiles, window):
    B, H, n, D = 1, 2, 11, 3
    q, k, v = _qkv(B, H, H, n, D, seed=8)
    perm = sa.random_permutation(B, H, n, generator=torch.Generator().manual_seed(2))
    for layout in ("band", "block"):
        kw = dict(window=window, perm=perm, layout=layout)
        ref = sa.fractional_attention(q, k, v, 1.2, backend="reference", **kw)
        torch.testing.assert_close(sa.fractional_attention(q, k, v, 1.2, **kw), ref)
    if window == 1:  # each query sees only itself
        torch.testing.assert_close(ref, v)


def test_identity_permutation_is_sliding_window(small_tiles):
    B, H, n, D, w = 2, 3, 21, 4, 5
    q, k, v = _qkv(B, H, H, n, D, seed=6)
    pad = _padding(B, n)
    swa = sa.fractional_attention(q, k, v, 1.2, window=w, key_mask=pad)
    ident = sa.fractional_attention(q, k, v, 1.2, window=w, key_mask=pad,
                                    perm=torch.arange(n))
    torch.testing.assert_close(ident, swa)


def test_alpha_two_windowed_matches_core_stochastic_attention_for_equal_key_norms(small_tiles):
    # With all keys of one norm, FNA at alpha = 2 is softmax attention with scale 2 / s^2: the
    # windowed kernel must then see exactly the keys the core operator sees.
    B, H, n, D, w, s = 2, 2, 29, 8, 7, 2.0
    q, k, v = _qkv(B, H, H, n, D, seed=7)
    k = k / k.norm(dim=-1, keepdim=True)
    perm = sa.random_permutation(B, H, n, generator=torch.Generator().manual_seed(1))
    for causal in (False, True):
        ours = sa.fractional_attention(q, k, v, 2.0, scale=s, window=w, perm=perm, causal=causal)
        core = sa.stochastic_attention(q, k, v, w, perm=perm, causal=causal, scale=2 / s**2,
                                       backend="reference")
        torch.testing.assert_close(ours, core, atol=1e-5, rtol=1e-4)  # the core reference is fp32


def test_far_away_keys_do_not_underflow_in_the_fast_backends():
    q, k, v = _qkv(1, 1, 1, 9, 16, dtype=torch.float32)
    q = q * 1e4  # every kernel value underflows to 0 in fp32 when evaluated literally
    for alpha in (1.2, 2.0):
        out = sa.fractional_attention(q, k, v, alpha, scale=1.0)
        assert torch.isfinite(out).all()
        assert out.abs().sum() > 0


def test_float32_and_half_inputs_keep_their_dtype():
    q, k, v = _qkv(1, 2, 1, 10, 4, dtype=torch.float32)
    ref64 = sa.fractional_attention(q.double(), k.double(), v.double(), 1.2)
    out = sa.fractional_attention(q, k, v, 1.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref64, atol=1e-5, rtol=1e-4)
    half = sa.fractional_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1.2, window=3)
    assert half.dtype == torch.bfloat16


def test_default_scale_rule():
    assert fractional.fractional_scale(16, 2.0) == pytest.approx(4.0)
    assert fractional.fractional_scale(16, 1.2) == pytest.approx(4.0 / (2 ** (1 / 16) - 1))
    assert fractional.fractional_scale(16, 1.2, "dim") == 16.0
    q, k, v = _qkv(1, 1, 1, 6, 16)
    by_name = sa.fractional_attention(q, k, v, 1.2, scale="levy")
    by_default = sa.fractional_attention(q, k, v, 1.2)
    torch.testing.assert_close(by_name, by_default)


@pytest.mark.parametrize("alpha", [0, -1.0, 2.5, float("nan")])
def test_bad_alpha_raises(alpha):
    q, k, v = _qkv(1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="alpha"):
        sa.fractional_attention(q, k, v, alpha)


def test_bad_arguments_raise_with_a_fix():
    q, k, v = _qkv(1, 1, 1, 8, 4)
    with pytest.raises(TypeError, match="alpha"):
        sa.fractional_attention(q, k, v, "1.2")
    with pytest.raises(ValueError, match="eps"):
        sa.fractional_attention(q, k, v, 1.2, eps=0)
    with pytest.raises(ValueError, match="scale"):
        sa.fractional_attention(q, k, v, 1.2, scale=-1.0)
    with pytest.raises(ValueError, match="window="):
        sa.fractional_attention(q, k, v, 1.2, perm=torch.arange(8))
    with pytest.raises(ValueError, match="blocked"):
        sa.fractional_attention(q, k, v, 1.2, window=3, backend="chunked")
    with pytest.raises(ValueError, match="backend"):
        sa.fractional_attention(q, k, v, 1.2, backend="flash")
