"""BigBird-style attention: the O(n * (w + r + s)) path against the dense reference, the draw,
the counts, and oracles that do not use the operator's own mask code."""

from __future__ import annotations

import itertools

import pytest
import torch

from stochastic_attention.ops.bigbird import (
    bigbird_attended_keys,
    bigbird_attention,
    bigbird_indices,
    bigbird_mask,
    bigbird_reference,
)
from stochastic_attention.testing import assert_matches_reference, random_qkv

B, HQ, HKV, D = 2, 4, 2, 8


def make_qkv(n: int, kv_heads: int = HKV, dtype=torch.float32, seed: int = 0, device="cpu"):
    return random_qkv(n, batch=B, heads=HQ, kv_heads=kv_heads, dim=D, dtype=dtype, seed=seed, device=device)


def left_padding(n: int) -> torch.Tensor:
    """Sample 0 unpadded, sample 1 left-padded by a third (at least one token when n > 1)."""
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, : max(n // 3, 1 if n > 1 else 0)] = False
    return mask


CASES = list(itertools.product((1, 7, 63, 130), (1, 5, 16), (0, 1, 8), (0, 2)))


@pytest.mark.parametrize("n,window,random_keys,sinks", CASES)
@pytest.mark.parametrize("per_head,pad", [(False, False), (True, True)])
def test_fast_path_matches_dense_reference(n, window, random_keys, sinks, per_head, pad, device):
    q, k, v = make_qkv(n, device=device)
    kpm = left_padding(n).to(device) if pad else None
    idx = bigbird_indices(B, HQ if per_head else 1, n, window, random_keys, sinks=sinks,
                          generator=torch.Generator().manual_seed(n + window))
    assert_matches_reference(bigbird_attention, bigbird_reference, (q, k, v), window=window,
                             random_keys=random_keys, sinks=sinks, key_mask=kpm, indices=idx.to(device),
                             atol=1e-5, grad_atol=1e-5, rtol=1e-5)


def test_float64_inputs_keep_their_dtype_and_match():
    q, k, v = make_qkv(40, dtype=torch.float64)
    idx = bigbird_indices(B, 1, 40, 4, 6, sinks=1, generator=torch.Generator().manual_seed(0))
    out = bigbird_attention(q, k, v, 4, 6, sinks=1, indices=idx)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, bigbird_reference(q, k, v, 4, 6, sinks=1, indices=idx),
                               rtol=1e-5, atol=1e-5)


def test_reference_against_an_explicit_key_list():
    # Oracle independent of bigbird_mask: build each query's key set from the rule in words.
    n, window, r, sinks = 23, 3, 4, 2
    q, k, v = make_qkv(n, kv_heads=HQ)
    idx = bigbird_indices(B, HQ, n, window, r, sinks=sinks,
                          generator=torch.Generator().manual_seed(1))
    out = bigbird_attention(q, k, v, window, r, sinks=sinks, indices=idx)
    for b, h, i in itertools.product(range(B), range(HQ), range(n)):
        keys = {j for j in range(n) if i - window < j <= i or j < min(sinks, i + 1)}
        keys |= {int(j) for j in idx[b, h, i] if j >= 0}
        keys = sorted(keys)
        weights = torch.softmax(q[b, h, i] @ k[b, h, keys].T * D**-0.5, -1)
        torch.testing.assert_close(out[b, h, i], weights @ v[b, h, keys], rtol=1e-5, atol=1e-5)


def test_draw_stays_outside_window_and_sinks_and_repeats_count_once():
    n, window, r, sinks = 50, 6, 8, 3
    idx = bigbird_indices(3, 2, n, window, r, sinks=sinks,
                          generator=torch.Generator().manual_seed(0))
    assert idx.shape == (3, 2, n, r) and idx.dtype == torch.long
    i = torch.arange(n).view(n, 1)
    kept = idx >= 0
    assert bool(((idx >= sinks) & (idx <= i - window))[kept].all())
    assert not bool(kept[:, :, : window + sinks - 1].any())  # no candidate there
    for row in idx.reshape(-1, r):
        real = row[row >= 0].tolist()
        assert len(real) == len(set(real))
    # Queries with many candidates almost surely keep most of their r draws.
    assert kept[:, :, -1].sum(-1).float().mean() > r / 2


def test_repeated_user_indices_count_once():
    n, window = 12, 2
    q, k, v = make_qkv(n)
    idx = torch.full((1, 1, n, 3), -1)
    idx[0, 0, 9] = torch.tensor([4, 4, 1])
    once = idx.clone()
    once[0, 0, 9] = torch.tensor([4, -1, 1])
    twice = bigbird_attention(q, k, v, window, 3, indices=idx)
    torch.testing.assert_close(twice, bigbird_attention(q, k, v, window, 3, indices=once))
    torch.testing.assert_close(twice, bigbird_reference(q, k, v, window, 3, indices=once))
    counts = bigbird_attended_keys(n, window, 3, indices=idx)
    assert counts[0, 0, 9] == window + 2


def test_generator_fixes_the_draw_and_fresh_draws_differ():
    n = 64
    q, k, v = make_qkv(n)
    a = bigbird_attention(q, k, v, 4, 4, generator=torch.Generator().manual_seed(5))
    b = bigbird_attention(q, k, v, 4, 4, generator=torch.Generator().manual_seed(5))
    c = bigbird_attention(q, k, v, 4, 4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("per_head", [False, True])
def test_no_future_leak(per_head):
    n, window, r, sinks = 40, 4, 6, 2
    q, k, v = make_qkv(n)
    idx = bigbird_indices(B, HQ if per_head else 1, n, window, r, sinks=sinks,
                          generator=torch.Generator().manual_seed(2))
    base = bigbird_attention(q, k, v, window, r, sinks=sinks, indices=idx)
    for j in (0, 1, 17, 39):
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[:, :, j] += 10.0
        v2[:, :, j] -= 10.0
        out = bigbird_attention(q, k2, v2, window, r, sinks=sinks, indices=idx)
        torch.testing.assert_close(out[:, :, :j], base[:, :, :j], rtol=0, atol=0)
        assert not torch.allclose(out[:, :, j], base[:, :, j])  # the query sees itself


def test_padded_keys_are_never_seen_and_empty_queries_give_zero():
    n, window, r = 30, 3, 5
    q, k, v = make_qkv(n)
    kpm = left_padding(n)
    idx = bigbird_indices(B, 1, n, window, r, generator=torch.Generator().manual_seed(0))
    base = bigbird_attention(q, k, v, window, r, key_mask=kpm, indices=idx)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, :10] = 100.0
    v2[1, :, :10] = -100.0
    out = bigbird_attention(q, k2, v2, window, r, key_mask=kpm, indices=idx)
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    assert torch.equal(out[1, :, :10], torch.zeros_like(out[1, :, :10]))


@pytest.mark.parametrize("n,window,r,sinks", [(1, 1, 3, 0), (17, 2, 4, 3), (64, 8, 8, 2),
                                              (130, 16, 1, 0)])
def test_attended_keys_are_the_dense_row_sums(n, window, r, sinks):
    kpm = left_padding(n)
    for heads in (1, 3):
        idx = bigbird_indices(B, heads, n, window, r, sinks=sinks,
                              generator=torch.Generator().manual_seed(n))
        for mask in (None, kpm):
            counts = bigbird_attended_keys(n, window, r, sinks, indices=idx,
                                           key_mask=mask)
            dense = bigbird_mask(n, window, idx, sinks=sinks, key_mask=mask).sum(-1)
            assert torch.equal(counts, dense)
    # Without indices: the draw the operator makes from the same generator.
    counts = bigbird_attended_keys(n, window, r, sinks, generator=torch.Generator().manual_seed(4))
    idx = bigbird_indices(1, 1, n, window, r, sinks=sinks,
                          generator=torch.Generator().manual_seed(4))
    assert torch.equal(counts, bigbird_mask(n, window, idx, sinks=sinks).sum(-1))


def test_no_random_keys_is_a_sliding_window_with_sinks():
    import stochastic_attention as sa
    n = 50
    q, k, v = make_qkv(n)
    kpm = left_padding(n)
    out = bigbird_attention(q, k, v, 7, 0, sinks=2, key_mask=kpm)
    ref = sa.sliding_window_attention(q, k, v, 7, sinks=2, key_mask=kpm,
                                      backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_window_covering_the_sequence_is_full_causal_attention():
    n = 20
    q, k, v = make_qkv(n)
    out = bigbird_attention(q, k, v, n, 5, sinks=2)
    full = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_empty_sequence_gives_an_empty_output():
    q, k, v = make_qkv(0)
    out = bigbird_attention(q, k, v, 4, 3, sinks=2)
    assert out.shape == q.shape
    assert bigbird_attended_keys(0, 4, 3, 2).shape == (1, 1, 0)


def test_bad_arguments_raise_clear_errors():
    q, k, v = make_qkv(10)
    with pytest.raises(ValueError, match="window"):
        bigbird_attention(q, k, v, 0, 2)
    with pytest.raises(ValueError, match="random_keys"):
        bigbird_attention(q, k, v, 3, -1)
    with pytest.raises(TypeError, match="random_keys"):
        bigbird_attention(q, k, v, 3, 1.5)
    with pytest.raises(ValueError, match="sinks"):
        bigbird_attention(q, k, v, 3, 2, sinks=-1)
    with pytest.raises(ValueError, match="multiple"):
        bigbird_attention(q, k[:, :1].expand(B, 3, 10, D), v[:, :1].expand(B, 3, 10, D), 3, 2)
    with pytest.raises(TypeError, match="key_mask"):
        bigbird_attention(q, k, v, 3, 2, key_mask=torch.ones(B, 10))
    with pytest.raises(ValueError, match="indices must have shape"):
        bigbird_attention(q, k, v, 3, 2, indices=torch.full((B, 1, 10, 5), -1))
    bad = torch.full((1, 1, 10, 2), -1)
    bad[0, 0, 5, 0] = 4  # inside query 5's window of 3
    with pytest.raises(ValueError, match="outside the query's window"):
        bigbird_attention(q, k, v, 3, 2, indices=bad)
    bad[0, 0, 5, 0] = 8  # the future
    with pytest.raises(ValueError, match="outside the query's window"):
        bigbird_attention(q, k, v, 3, 2, indices=bad)
    with pytest.raises(TypeError, match="indices"):
        bigbird_attention(q, k, v, 3, 2, indices=bad.float())
