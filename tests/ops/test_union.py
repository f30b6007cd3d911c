"""The SA + local union in the core operator (``local=``): the O(n * w) two-pass kernel against
the dense reference, plus oracles that do not use the union's own code."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import stochastic_attention as sa
from stochastic_attention.ops.dense import merge_attention
from stochastic_attention.ops.patterns import dense_mask
from stochastic_attention.ops.reference import masked_attention
from stochastic_attention.testing import assert_matches_reference, random_key_mask, random_qkv

LENGTHS = (1, 7, 63, 130, 257)
CASES = list(itertools.product(LENGTHS, ("band", "block"), (0, 3), (False, True), (1, 5, 40)))


@pytest.mark.parametrize("n,layout,sinks,pad,local", CASES)
def test_blocked_union_matches_reference(n, layout, sinks, pad, local, device):
    q, k, v = random_qkv(n, device=device)
    kpm = random_key_mask(2, n, device=device) if pad else None
    perm = sa.random_permutation(2, 4, n, generator=torch.Generator().manual_seed(n)).to(device)
    kw = dict(window=8, perm=perm, layout=layout, sinks=sinks, key_mask=kpm, local=local)
    assert_matches_reference(partial(sa.stochastic_attention, backend="blocked"),
                             partial(sa.stochastic_attention, backend="reference"), (q, k, v), **kw)


@pytest.mark.parametrize("per_head", [False, True])
def test_union_is_the_or_of_two_dense_masks(per_head, device):
    # Independent of patterns.visible(local=...): the SA mask OR a sliding-window mask.
    n, window, local, sinks = 37, 6, 4, 2
    q, k, v = random_qkv(n, kv_heads=4, device=device)
    kpm = random_key_mask(2, n)
    perm = sa.random_permutation(2, 4 if per_head else 1, n, generator=torch.Generator().manual_seed(3))
    mask = dense_mask(n, window, perm=perm, sinks=sinks, key_mask=kpm) | dense_mask(
        n, local, key_mask=kpm)
    assert_matches_reference(
        lambda q, k, v: sa.stochastic_attention(q, k, v, window=window, perm=perm.to(device), sinks=sinks,
                                                local=local, key_mask=kpm.to(device)),
        lambda q, k, v: masked_attention(q, k, v, mask.to(device), 16 ** -0.5), (q, k, v))


@pytest.mark.parametrize("window,local,sinks", [(5, 9, 0), (9, 5, 2), (7, 7, 1)])
def test_identity_perm_union_is_swa_of_the_larger_window(window, local, sinks):
    n = 63
    q, k, v = random_qkv(n, grad=False)
    ident = torch.arange(n)
    out = sa.stochastic_attention(q, k, v, window, perm=ident, sinks=sinks, local=local)
    swa = sa.sliding_window_attention(q, k, v, max(window, local), sinks=sinks, backend="reference")
    torch.testing.assert_close(out, swa, atol=1e-5, rtol=0)


def test_local_zero_is_plain_sa_and_local_covering_is_full():
    n = 50
    q, k, v = random_qkv(n, grad=False)
    perm = sa.random_permutation(2, 1, n, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sa.stochastic_attention(q, k, v, 4, perm=perm, local=0),
                               sa.stochastic_attention(q, k, v, 4, perm=perm))
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          is_causal=True)
    torch.testing.assert_close(sa.stochastic_attention(q, k, v, 4, perm=perm, local=n), full, atol=1e-5, rtol=0)


def test_union_has_no_future_leak():
    n = 40
    q, k, v = random_qkv(n, grad=False)
    perm = sa.random_permutation(2, 4, n, generator=torch.Generator().manual_seed(2))
    base = sa.stochastic_attention(q, k, v, 6, perm=perm, local=3, sinks=1)
    v2 = v.clone()
    v2[:, :, 30:] += 100.0
    k2 = k.clone()
    k2[:, :, 30:] -= 5.0
    changed = sa.stochastic_attention(q, k2, v2, 6, perm=perm, local=3, sinks=1)
    torch.testing.assert_close(changed[:, :, :30], base[:, :, :30])
    assert not torch.allclose(changed[:, :, 30:], base[:, :, 30:])


def test_union_bf16_close_to_fp32_reference():
    n = 130
    q, k, v = random_qkv(n, grad=False)
    perm = sa.random_permutation(2, 1, n, generator=torch.Generator().manual_seed(5))
    ref = sa.stochastic_attention(q, k, v, 16, perm=perm, local=8, sinks=2, backend="reference")
    out = sa.stochastic_attention(*(t.bfloat16() for t in (q, k, v)), 16, perm=perm, local=8,
                                  sinks=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)


def test_merge_parts_of_disjoint_sets_is_one_softmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 10, generator=g)
    v = torch.randn(3, 10, 4, generator=g)
    a, b = slice(0, 6), slice(6, 10)

    def part(s):
        return torch.softmax(scores[:, s], -1) @ v[:, s], torch.logsumexp(scores[:, s], -1)

    def merge_parts(out_a, lse_a, out_b, lse_b):
        return merge_attention([out_a, out_b], [lse_a, lse_b])

    merged, lse = merge_parts(*part(a), *part(b))
    torch.testing.assert_close(merged, torch.softmax(scores, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    empty = torch.full((3,), float("-inf"))
    torch.testing.assert_close(merge_parts(*part(a), torch.zeros(3, 4), empty)[0], part(a)[0])
    both_empty, lse = merge_parts(torch.zeros(3, 4), empty, torch.zeros(3, 4), empty)
    assert torch.equal(both_empty, torch.zeros(3, 4)) and torch.equal(lse, empty)


@pytest.mark.parametrize("layout,sinks,pad", [("band", 0, False), ("block", 3, True), ("band", 2, True)])
def test_attended_keys_counts_the_union(layout, sinks, pad):
    n = 57
    kpm = random_key_mask(2, n) if pad else None
    perm = sa.random_permutation(2, 3, n, generator=torch.Generator().manual_seed(4))
    for local in (1, 6, 20):
        counts = sa.attended_keys(n, 5, perm=perm, layout=layout, sinks=sinks, local=local,
                                  key_mask=kpm)
        dense = dense_mask(n, 5, perm=perm, layout=layout, sinks=sinks, local=local,
                           key_mask=kpm).sum(-1)
        assert torch.equal(counts, dense.expand_as(counts))


@pytest.mark.parametrize("layout,sinks,local", [("band", 0, 3), ("block", 2, 4), ("band", 1, 1)])
def test_stochastic_local_matches_dense_union(layout, sinks, local):
    q, k, v = random_qkv(13, dim=8)
    perm = sa.random_permutation(2, 4, 13, generator=torch.Generator().manual_seed(1))
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[0, 10:] = False
    mask = dense_mask(13, 4, perm=perm, layout=layout, sinks=sinks, key_mask=kpm) | \
        dense_mask(13, local, key_mask=kpm)
    assert_matches_reference(
        lambda q, k, v: sa.stochastic_attention(q, k, v, 4, perm=perm, layout=layout, sinks=sinks,
                                                local=local, key_mask=kpm),
        lambda q, k, v: masked_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask,
                                         8**-0.5),
        (q, k, v), atol=1e-5, grad_atol=1e-5, rtol=1.3e-6)  # torch.testing.assert_close's float32 defaults


def test_stochastic_local_reduces_to_sa_and_to_full():
    q, k, v = random_qkv(13, dim=8)
    perm = sa.random_permutation(2, 4, 13, generator=torch.Generator().manual_seed(2))
    plain = sa.stochastic_attention(q, k, v, 5, perm=perm, backend="reference")
    torch.testing.assert_close(sa.stochastic_attention(q, k, v, 5, perm=perm, local=0), plain)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          is_causal=True)
    torch.testing.assert_close(sa.stochastic_attention(q, k, v, 2, perm=perm, local=13), full)


def test_local_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(9, grad=False)
    with pytest.raises(ValueError, match="local must be >= 0"):
        sa.stochastic_attention(q, k, v, 3, local=-1)
    with pytest.raises(TypeError, match="local must be an int"):
        sa.stochastic_attention(q, k, v, 3, local=2.5)
    with pytest.raises(ValueError, match="local > 0 needs causal=True"):
        sa.stochastic_attention(q, k, v, 3, local=2, causal=False)
    with pytest.raises(ValueError, match="backend='flex' does not serve local"):
        sa.stochastic_attention(q, k, v, 3, local=2, backend="flex")
