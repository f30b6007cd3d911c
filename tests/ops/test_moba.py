"""MoBA and the SA + local union against slow references: outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

from stochastic_attention import random_permutation, stochastic_attention
from stochastic_attention.ops.moba import (
    chosen_blocks,
    moba_attended_keys,
    moba_attention,
    moba_masked,
    moba_reference,
)
from stochastic_attention.ops.patterns import dense_mask
from stochastic_attention.ops.reference import masked_attention


def _qkv(B=2, Hq=4, Hkv=2, n=13, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float32) for h in (Hq, Hkv, Hkv))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _grads(out, tensors):
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                               tensors)


@pytest.mark.parametrize("block,top_k,sinks,pad", [(3, 2, 0, False), (4, 1, 2, True),
                                                  (5, 3, 1, True), (1, 4, 0, False)])
def test_moba_matches_reference(block, top_k, sinks, pad):
    q, k, v = _qkv()
    kpm = None
    if pad:
        kpm = torch.ones(2, 13, dtype=torch.bool)
        kpm[1, :4] = False
    slow = moba_reference(q, k, v, block, top_k, sinks=sinks, key_mask=kpm)
    slow_grads = _grads(slow, (q, k, v))
    for fn in (moba_attention, moba_masked):
        fast = fn(q, k, v, block, top_k, sinks=sinks, key_mask=kpm)
        torch.testing.assert_close(fast, slow)
        for a, b in zip(_grads(fast, (q, k, v)), slow_grads, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n,block,top_k,sinks", [(1, 4, 2, 0), (130, 16, 3, 4), (257, 32, 2, 1),
                                                 (64, 8, 1, 9), (100, 7, 20, 2)])
def test_block_sparse_moba_matches_masked_moba(n, block, top_k, sinks, monkeypatch):
    import stochastic_attention.ops.moba as moba

    monkeypatch.setattr(moba, "PAIR_TILE", 3)  # many ragged tiles
    q, k, v = _qkv(n=n)
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, : n // 3] = False
    kpm[1, n // 2:] = False
    for mask in (None, kpm):
        fast = moba_attention(q, k, v, block, top_k, sinks=sinks, key_mask=mask)
        slow = moba_masked(q, k, v, block, top_k, sinks=sinks, key_mask=mask)
        torch.testing.assert_close(fast, slow)
        for a, b in zip(_grads(fast, (q, k, v)), _grads(slow, (q, k, v)), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_moba_with_all_blocks_is_full_causal_attention():
    q, k, v = _qkv(n=17)
    out = moba_attention(q, k, v, block_size=4, top_k=5)  # 5 blocks cover 17 tokens
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          is_causal=True)
    torch.testing.assert_close(out, full)


def test_moba_never_chooses_future_blocks_and_counts_keys():
    q, k, v = _qkv(n=20)
    chosen = chosen_blocks(q, k, 4, 3, None)
    own = torch.arange(20) // 4
    assert not (chosen & (torch.arange(5)[None, :] > own[:, None])).any()
    assert chosen[..., own[:, None] == torch.arange(5)].all()
    assert (chosen.sum(-1) == torch.clamp(own + 1, max=3)).all()
    expected = [min(i // 4, 2) * 4 + i % 4 + 1 for i in range(20)]
    assert moba_attended_keys(20, 4, 3).tolist() == expected


def test_moba_rejects_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="block_size"):
        moba_attention(q, k, v, 0, 2)
    with pytest.raises(TypeError, match="top_k"):
        moba_attention(q, k, v, 4, 2.0)
    with pytest.raises(TypeError, match="'topk' was renamed 'top_k'"):
        moba_attention(q, k, v, block_size=4, topk=2)


@pytest.mark.parametrize("layout,sinks,local", [("band", 0, 3), ("block", 2, 4), ("band", 1, 1)])
def test_stochastic_local_matches_dense_union(layout, sinks, local):
    q, k, v = _qkv()
    perm = random_permutation(2, 4, 13, generator=torch.Generator().manual_seed(1))
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[0, 10:] = False
    out = stochastic_attention(q, k, v, 4, perm=perm, layout=layout, sinks=sinks, local=local,
                               key_mask=kpm)
    mask = dense_mask(13, 4, perm=perm, layout=layout, sinks=sinks, key_mask=kpm) | \
        dense_mask(13, local, key_mask=kpm)
    ref = masked_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask,
                           8**-0.5)
    torch.testing.assert_close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(a, b)


def test_stochastic_local_reduces_to_sa_and_to_full():
    q, k, v = _qkv()
    perm = random_permutation(2, 4, 13, generator=torch.Generator().manual_seed(2))
    sa = stochastic_attention(q, k, v, 5, perm=perm, backend="reference")
    torch.testing.assert_close(stochastic_attention(q, k, v, 5, perm=perm, local=0), sa)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          is_causal=True)
    torch.testing.assert_close(stochastic_attention(q, k, v, 2, perm=perm, local=13), full)
