"""MoBA against its slow references (outputs and gradients), its block choice and its budget."""

import pytest
import torch
import torch.nn.functional as F

from stochastic_attention.ops.moba import (
    chosen_blocks,
    moba_attended_keys,
    moba_attention,
    moba_masked,
    moba_reference,
)
from stochastic_attention.testing import assert_matches_reference, random_qkv

# atol=1e-5, rtol=1.3e-6 below: torch.testing.assert_close's float32 defaults.


@pytest.mark.parametrize("block,top_k,sinks,pad", [(3, 2, 0, False), (4, 1, 2, True),
                                                  (5, 3, 1, True), (1, 4, 0, False)])
def test_moba_matches_reference(block, top_k, sinks, pad, device):
    q, k, v = random_qkv(13, dim=8, device=device)
    kpm = None
    if pad:
        kpm = torch.ones(2, 13, dtype=torch.bool, device=device)
        kpm[1, :4] = False
    for fn in (moba_attention, moba_masked):
        assert_matches_reference(fn, moba_reference, (q, k, v), block_size=block, top_k=top_k,
                                 sinks=sinks, key_mask=kpm, atol=1e-5, grad_atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("n,block,top_k,sinks", [(1, 4, 2, 0), (130, 16, 3, 4), (257, 32, 2, 1),
                                                 (64, 8, 1, 9), (100, 7, 20, 2)])
def test_block_sparse_moba_matches_masked_moba(n, block, top_k, sinks, monkeypatch, device):
    import stochastic_attention.ops.moba as moba

    monkeypatch.setattr(moba, "PAIR_TILE", 3)  # many ragged tiles
    q, k, v = random_qkv(n, dim=8, device=device)
    kpm = torch.ones(2, n, dtype=torch.bool, device=device)
    kpm[0, : n // 3] = False
    kpm[1, n // 2:] = False
    for mask in (None, kpm):
        assert_matches_reference(moba_attention, moba_masked, (q, k, v), block_size=block, top_k=top_k,
                                 sinks=sinks, key_mask=mask, atol=1e-5, rtol=1.3e-6, grad_atol=1e-4, grad_rtol=1e-4)


def test_moba_with_all_blocks_is_full_causal_attention():
    q, k, v = random_qkv(dim=8, n=17)
    out = moba_attention(q, k, v, block_size=4, top_k=5)  # 5 blocks cover 17 tokens
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          is_causal=True)
    torch.testing.assert_close(out, full)


def test_moba_never_chooses_future_blocks_and_counts_keys():
    q, k, v = random_qkv(dim=8, n=20)
    chosen = chosen_blocks(q, k, 4, 3, None)
    own = torch.arange(20) // 4
    assert not (chosen & (torch.arange(5)[None, :] > own[:, None])).any()
    assert chosen[..., own[:, None] == torch.arange(5)].all()
    assert (chosen.sum(-1) == torch.clamp(own + 1, max=3)).all()
    expected = [min(i // 4, 2) * 4 + i % 4 + 1 for i in range(20)]
    assert moba_attended_keys(20, 4, 3).tolist() == expected


def test_moba_rejects_bad_arguments():
    q, k, v = random_qkv(13, dim=8)
    with pytest.raises(ValueError, match="block_size"):
        moba_attention(q, k, v, 0, 2)
    with pytest.raises(TypeError, match="top_k"):
        moba_attention(q, k, v, 4, 2.0)
    with pytest.raises(TypeError, match="'topk' was renamed 'top_k'"):
        moba_attention(q, k, v, block_size=4, topk=2)
