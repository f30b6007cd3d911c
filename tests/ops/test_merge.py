"""Merged attention over disjoint key sets (ops/merge.py) against one softmax over all the keys."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import stochastic_attention as sa
from stochastic_attention.ops import blocked, merge, parts
from stochastic_attention.ops.merge import Part, attend_parts, attend_parts_reference
from stochastic_attention.ops.parts import window_part
from stochastic_attention.testing import assert_matches_reference, outputs_and_grads

SCALE = 0.37


def dense(q, ks, vs, masks):
    """One explicit softmax over the concatenated keys; rows with no key give 0."""
    lead, T = q.shape[:-2], q.shape[-2]
    k, v = torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)
    mask = torch.cat([m.expand(*lead, T, kk.shape[-2]) for m, kk in zip(masks, ks)], dim=-1)
    scores = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~mask, -math.inf)
    has_key = mask.any(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(has_key, scores, 0.0), dim=-1)
    return torch.where(has_key, p @ v, 0.0)


def make_case(n_parts, dtype, *, empty_in_one=True, empty_in_all=True, gqa=1, seed=0):
    """q [2, 4, 7, 5]; part i has an odd number of keys and a random mask of its own shape."""
    g = torch.Generator().manual_seed(seed)
    N, M, T, D = 2, 4, 7, 5
    q = torch.randn(N, M, T, D, generator=g, dtype=dtype, requires_grad=True)
    ks, vs, masks = [], [], []
    for i in range(n_parts):
        S = (3, 9, 1)[i]
        ks.append(torch.randn(N, M // gqa, S, D, generator=g, dtype=dtype, requires_grad=True))
        vs.append(torch.randn(N, M // gqa, S, D, generator=g, dtype=dtype, requires_grad=True))
        shape = [(1, M, T, S), (N, 1, T, S), (N, M, T, S)][i]
        m = torch.rand(shape, generator=g) > 0.35
        if empty_in_one and i == 0:
            m[..., 2, :] = False
        if empty_in_all:
            m[..., 4, :] = False
        masks.append(m)
    return q, ks, vs, masks


def expand(x, gqa):
    return x.repeat_interleave(gqa, dim=1)


def tolerance(dtype):
    """Outputs and gradients: float32 to 1e-5 / 1e-4, float64 to assert_close's defaults."""
    if dtype == torch.float32:
        return dict(atol=1e-5, grad_atol=1e-5, rtol=1e-4)
    return dict(atol=1e-7, grad_atol=1e-7, rtol=1e-7)


# The functions compared below are closures over their leaf tensors: assert_matches_reference
# passes the leaves (to take gradients with respect to them), the closures ignore the arguments.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_parts", [1, 2, 3])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("additive", [False, True])
def test_parts_equal_one_softmax_over_all_keys(dtype, n_parts, gqa, additive):
    q, ks, vs, masks = make_case(n_parts, dtype, gqa=gqa)

    def parts():
        out = []
        for k, v, m in zip(ks, vs, masks):
            mask = torch.zeros(m.shape, dtype=dtype).masked_fill(~m, -math.inf) if additive else m
            out.append(Part(q, expand(k, gqa), expand(v, gqa), mask))
        return out

    def reference(*_):
        return dense(q, [expand(k, gqa) for k in ks], [expand(v, gqa) for v in vs], masks)

    tol = tolerance(dtype) if dtype == torch.float32 else dict(atol=1e-12, grad_atol=1e-12, rtol=1e-10)
    for fn in (attend_parts, attend_parts_reference):
        # assert_close fails on NaN: a NaN gradient cannot pass
        out = assert_matches_reference(lambda *_, fn=fn: fn(parts(), SCALE), reference, (q, *ks, *vs), **tol)
        assert out.dtype == dtype


@pytest.mark.parametrize("fn", [attend_parts, attend_parts_reference])
def test_rows_without_keys_give_zeros_and_zero_gradients(fn):
    q, ks, vs, masks = make_case(3, torch.float32)
    masks = [torch.zeros_like(m) for m in masks]
    masks[1][..., 3, 0] = True  # one row sees one key in one part
    out, got = outputs_and_grads(lambda *_: fn([Part(q, k, v, m) for k, v, m in zip(ks, vs, masks)], SCALE),
                                 (q, *ks, *vs))
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in got)
    empty = torch.ones(out.shape[2], dtype=torch.bool)
    empty[3] = False
    assert (out[:, :, empty] == 0).all() and (got[0][:, :, empty] == 0).all()
    torch.testing.assert_close(out[:, :, 3], vs[1][:, :, 0].expand_as(out[:, :, 3]))


def test_parts_without_masks_and_one_key():
    q, ks, vs, masks = make_case(3, torch.float64, empty_in_one=False, empty_in_all=False)
    full = [torch.ones_like(m) for m in masks]
    assert_matches_reference(lambda *_: attend_parts([Part(q, k, v) for k, v in zip(ks, vs)], SCALE),
                             lambda *_: dense(q, ks, vs, full), (q, *ks, *vs), **tolerance(torch.float64))


def test_gradcheck_float64():
    q, ks, vs, masks = make_case(3, torch.float64)

    def fn(q, *kv):
        k3, v3 = kv[:3], kv[3:]
        return attend_parts([Part(q, k, v, m) for k, v, m in zip(k3, v3, masks)], SCALE)

    assert torch.autograd.gradcheck(fn, (q, *ks, *vs))


def test_part_layouts_map_back_with_tile_padding():
    """A block-layout window on an odd length pads its last tile: the padded query rows must
    neither show up in the output nor leak into the key gradients."""
    g = torch.Generator().manual_seed(1)
    B, H, n, D, window = 2, 3, 37, 4, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    key_valid = torch.rand(B, 1, n, generator=g) > 0.3
    kw = dict(pos=None, key_valid=key_valid, layout="block", causal=True, sinks=0, sink_k=None,
              sink_v=None, sink_valid=None, scale=SCALE)
    for fn in (attend_parts, attend_parts_reference):
        assert_matches_reference(
            lambda q, k, v, fn=fn: fn([window_part(blocked.windowed_attention(
                q, k, v, window, return_tiles=True, **kw))], SCALE),
            lambda q, k, v: blocked.windowed_attention(q, k, v, window, **kw),
            (q, k, v), **tolerance(torch.float64))


def test_no_parts_is_an_error():
    with pytest.raises(ValueError, match="at least one part"):
        attend_parts([], SCALE)


@pytest.mark.parametrize("width", [1, 4, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recent_band_part_equals_dense_window(width, dtype):
    """Band offsets against a dense mask of positions (i - width, i], sinks and padding excluded."""
    g = torch.Generator().manual_seed(width)
    B, H, n, D, sinks = 2, 3, 23, 5, 2
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=dtype, requires_grad=True)
               for _ in range(3))
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[0, :7] = False  # left padding: its first queries see nothing
    i, j = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    mask = ((j <= i) & (j > i - width) & (j >= sinks))[None, None] & kpm[:, None, None, :]
    for fn in (attend_parts, attend_parts_reference):
        assert_matches_reference(
            lambda q, k, v, fn=fn: fn([parts.recent_band_part(q, k, v, width, skip_first=sinks,
                                                               key_mask=kpm)], SCALE),
            lambda q, k, v: dense(q, [k], [v], [mask]), (q, k, v), **tolerance(dtype))


def test_gradcheck_band_and_kernel_parts_float64():
    q, ks, vs, masks = make_case(2, torch.float64)
    n, width = q.shape[2], 3
    band_mask = (torch.arange(n).view(n, 1) - torch.arange(width) >= 0).view(1, 1, n, width)
    band_mask = band_mask & (torch.rand(2, 1, n, width, generator=torch.Generator().manual_seed(3))
                             > 0.3)

    def fn(q, k0, k1, v0, v1):
        return attend_parts([merge.BandPart(q, q.flip(-1), q.cos(), width, band_mask),
                             Part(q, k0, v0, masks[0]), Part(q, k1, v1, masks[1])], SCALE)

    assert torch.autograd.gradcheck(fn, (q, *ks, *vs))


@pytest.mark.parametrize("window", [7, merge.BAND_PART_MAX_WIDTH + 1])
@pytest.mark.parametrize("local", [merge.BAND_PART_MAX_WIDTH, merge.BAND_PART_MAX_WIDTH + 1])
def test_union_on_both_sides_of_the_band_part_threshold(window, local):
    """The SA + local union serves its SA window and its local part as offsets up to the
    threshold, as kernel tiles above it: every mix matches the dense reference."""
    g = torch.Generator().manual_seed(local)
    B, Hq, Hkv, n, D = 2, 4, 2, 61, 8
    q = torch.randn(B, Hq, n, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Hkv, n, D, generator=g, requires_grad=True) for _ in range(2))
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[1, :9] = False
    perm = sa.random_permutation(B, 1, n, generator=g)
    kw = dict(window=window, perm=perm, sinks=2, key_mask=kpm, local=local)
    assert_matches_reference(partial(sa.stochastic_attention, backend="blocked"),
                             partial(sa.stochastic_attention, backend="reference"), (q, k, v), **kw,
                             **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_part_with_shared_and_expanded_keys_equals_dense(dtype):
    """Per-row keys: random rows shared by two query heads (broadcast) plus two sink keys
    expanded to every row; gradients must sum over the broadcast and the expansion."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, n, r, S, D = 2, 2, 2, 9, 3, 2, 4
    q = torch.randn(B, Hkv * G, n, D, generator=g, dtype=dtype, requires_grad=True)
    kr, vr = (torch.randn(B, Hkv, 1, n, r, D, generator=g, dtype=dtype, requires_grad=True)
              for _ in range(2))
    ks, vs_ = (torch.randn(B, Hkv * G, S, D, generator=g, dtype=dtype, requires_grad=True)
               for _ in range(2))
    seen = torch.rand(B, 1, 1, n, r, generator=g) > 0.3
    seen[..., 1, :] = False
    sink_seen = (torch.arange(S) <= torch.arange(n).view(n, 1)).view(1, 1, n, S)
    sink_seen = sink_seen & (torch.arange(n) != 1).view(1, 1, n, 1)  # row 1: no key at all
    leaves = [q, kr, ks, vr, vs_]

    def parts():
        return [merge.RowsPart(q.view(B, Hkv, G, n, D), kr, vr, seen,
                               lambda x: x.reshape(B, Hkv * G, n, x.shape[-1]),
                               lambda x, fill: x.reshape(B, Hkv, G, n, x.shape[-1])),
                merge.RowsPart(q, ks[:, :, None].expand(B, Hkv * G, n, S, D),
                               vs_[:, :, None].expand(B, Hkv * G, n, S, D), sink_seen)]

    def reference():  # one softmax per row over its r + S keys
        k_all = torch.cat([kr.expand(B, Hkv, G, n, r, D).reshape(B, Hkv * G, n, r, D),
                           ks[:, :, None].expand(B, Hkv * G, n, S, D)], dim=-2)
        v_all = torch.cat([vr.expand(B, Hkv, G, n, r, D).reshape(B, Hkv * G, n, r, D),
                           vs_[:, :, None].expand(B, Hkv * G, n, S, D)], dim=-2)
        mask = torch.cat([seen.expand(B, Hkv, G, n, r).reshape(B, Hkv * G, n, r),
                          sink_seen.expand(B, Hkv * G, n, S)], dim=-1)
        return dense(q.unsqueeze(-2), [k_all], [v_all], [mask.unsqueeze(-2)]).squeeze(-2)

    for fn in (attend_parts, attend_parts_reference):
        out = assert_matches_reference(lambda *_, fn=fn: fn(parts(), SCALE), lambda *_: reference(), leaves,
                                       **tolerance(dtype))
        assert (out[:, :, 1] == 0).all()
    if dtype == torch.float64:
        def sinks_only(q, ks, vs_):
            return attend_parts([merge.RowsPart(q, ks[:, :, None].expand(B, Hkv * G, n, S, D),
                                                vs_[:, :, None].expand(B, Hkv * G, n, S, D),
                                                sink_seen)], SCALE)

        assert torch.autograd.gradcheck(sinks_only, (q, ks, vs_))
