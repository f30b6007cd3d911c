"""Sparse decoding over a KV cache (stochastic_attention.ops.decode): the gathered fast path
against a dense-mask reference built from the same draw, the sampler's distribution, and the
``decode="stochastic"`` option of the layer, SA-Llama and the HF patch."""

from collections import Counter

import pytest
import torch

from stochastic_attention.hf.attention import _with_cache
from stochastic_attention.hf.config import PatchConfig
from stochastic_attention.models import SALlamaConfig
from stochastic_attention.models.sa_llama import SALlamaForCausalLM
from stochastic_attention.nn import MultiHeadAttention
from stochastic_attention.nn.attention import cached_attention
from stochastic_attention.nn.cache import KVCache
from stochastic_attention.ops.decode import (
    draw_decode_keys,
    query_ranks,
    sample_distinct,
    selected_ranks,
    sparse_decode,
    sparse_decode_reference,
)
from stochastic_attention.testing import assert_matches_reference


def _qkv(B, hq, hkv, L, S, D=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
               for h, n in ((hq, L), (hkv, S), (hkv, S)))
    return [x.requires_grad_(grad) for x in (q, k, v)]


def _left_padded(lengths, S):
    return torch.stack([torch.arange(S) >= S - n for n in lengths])


def _draw(q, valid, *, window, sinks, local, seed=0, layer_idx=0):
    B, hq, L, _ = q.shape
    S = valid.shape[1] if valid is not None else None
    return draw_decode_keys(query_ranks(valid, B, S, L), valid.sum(-1).tolist(), hq,
                            sinks=sinks, local=local, window=window, seed=seed,
                            layer_idx=layer_idx)


# (B, hq, hkv, L, S, window, sinks, local, padded lengths or None)
CASES = [
    (1, 2, 2, 1, 40, 5, 0, 1, None),          # plain decode step, no sinks
    (2, 4, 2, 1, 37, 6, 3, 4, None),          # GQA, sinks, odd cache length
    (3, 4, 1, 1, 50, 7, 2, 3, (50, 31, 9)),   # left padding, MQA, one row shorter than budget
    (2, 2, 2, 3, 29, 4, 1, 2, (29, 20)),      # a chunk of 3 new queries with padding
    (1, 3, 3, 1, 6, 8, 2, 2, None),           # cache shorter than the budget
    (2, 2, 1, 1, 64, 20, 4, 8, (64, 40)),     # pools in the "medium" range of the sampler
    (1, 2, 2, 1, 1, 3, 1, 1, None),           # a single cached token
]


@pytest.mark.parametrize("case", CASES)
def test_gathered_decode_matches_the_dense_reference_for_the_same_draw(case):
    B, hq, hkv, L, S, window, sinks, local, lengths = case
    q, k, v = _qkv(B, hq, hkv, L, S, grad=True)
    valid = _left_padded(lengths, S) if lengths else torch.ones(B, S, dtype=torch.bool)
    draw = _draw(q, valid, window=window, sinks=sinks, local=local)
    kpm = valid if lengths else None
    out = assert_matches_reference(
        lambda q, k, v: sparse_decode(q, k, v, kpm, window=window, sinks=sinks, local=local, draw=draw),
        lambda q, k, v: sparse_decode_reference(q, k, v, kpm, draw, sinks=sinks, local=local),
        (q, k, v), atol=1e-7, grad_atol=1e-7, rtol=1e-7)  # assert_close's float64 defaults
    # without an explicit draw, the seeded default draws the same keys
    again = sparse_decode(q, k, v, kpm, window=window, sinks=sinks, local=local)
    torch.testing.assert_close(again, out)


def test_selected_keys_are_the_sinks_the_recent_and_the_drawn_ones():
    B, hq, L, S, window, sinks, local = 1, 3, 1, 100, 10, 4, 5
    q, _, _ = _qkv(B, hq, hq, L, S)
    valid = torch.ones(B, S, dtype=torch.bool)
    draw = _draw(q, valid, window=window, sinks=sinks, local=local)
    ranks, keep = selected_ranks(query_ranks(None, B, S, L), draw, sinks=sinks, local=local)
    for h in range(hq):
        chosen = ranks[0, h, 0][keep[0, h, 0]].tolist()
        assert len(chosen) == len(set(chosen)) == sinks + local + window
        assert set(range(sinks)) | set(range(S - local, S)) <= set(chosen)
        drawn = set(chosen) - set(range(sinks)) - set(range(S - local, S))
        assert len(drawn) == window and all(sinks <= r < S - local for r in drawn)
    # the heads draw independently
    assert len({tuple(sorted(ranks[0, h, 0].tolist())) for h in range(hq)}) > 1


def test_a_cache_within_the_budget_is_full_causal_attention():
    q, k, v = _qkv(2, 4, 2, 1, 9)
    out = sparse_decode(q, k, v, None, window=4, sinks=2, local=3)
    full = cached_attention(q, k, v, k.shape[2], 0, None)
    torch.testing.assert_close(out, full)
    small = sparse_decode(q, k, v, None, window=1, sinks=0, local=1)
    assert not torch.allclose(small, full)


def test_only_the_selected_keys_are_read():
    # NaN in every key and value outside the selected set: a dense mask would multiply them in
    B, hq, S, window, sinks, local = 2, 2, 80, 6, 2, 3
    q, k, v = _qkv(B, hq, hq, 1, S)
    valid = _left_padded((80, 50), S)
    draw = _draw(q, valid, window=window, sinks=sinks, local=local)
    ref = sparse_decode_reference(q, k, v, valid, draw, sinks=sinks, local=local)
    ranks, keep = selected_ranks(query_ranks(valid, B, S, 1), draw, sinks=sinks, local=local)
    used = torch.zeros(B, hq, S, dtype=torch.bool)
    for b, h, _, j in keep.nonzero().tolist():
        used[b, h, torch.nonzero(valid[b]).flatten()[ranks[b, h, 0, j]]] = True
    k2, v2 = (x.masked_fill(~used[..., None], float("nan")) for x in (k, v))
    out = sparse_decode(q, k2, v2, valid, window=window, sinks=sinks, local=local, draw=draw)
    torch.testing.assert_close(out, ref)


def test_a_sequence_draws_the_same_keys_alone_or_left_padded():
    S, window, sinks, local = 60, 5, 2, 2
    q, k, v = _qkv(2, 2, 2, 1, S, seed=3)
    valid = _left_padded((60, 23), S)
    batched = sparse_decode(q, k, v, valid, window=window, sinks=sinks, local=local, seed=7,
                            layer_idx=2)
    alone = sparse_decode(q[1:], k[1:, :, -23:], v[1:, :, -23:], None, window=window,
                          sinks=sinks, local=local, seed=7, layer_idx=2)
    torch.testing.assert_close(batched[1:], alone)
    other_seed = sparse_decode(q[1:], k[1:, :, -23:], v[1:, :, -23:], None, window=window,
                               sinks=sinks, local=local, seed=8, layer_idx=2)
    assert not torch.allclose(other_seed, alone)


@pytest.mark.parametrize("pool,m", [(6, 3), (7, 2), (9, 4), (40, 3)])
def test_sample_distinct_draws_every_subset_equally_often(pool, m):
    n = 12000
    offsets, keep = sample_distinct(torch.full((n,), pool), m, torch.Generator().manual_seed(0))
    assert bool(keep.all())
    subsets = Counter(tuple(sorted(row)) for row in offsets.tolist())
    assert all(len(set(s)) == m and 0 <= min(s) and max(s) < pool for s in subsets)
    if pool <= 9:  # few enough subsets to see each one
        from math import comb
        expected = n / comb(pool, m)
        assert len(subsets) == comb(pool, m)
        # chi-square against uniform: mean df, sd sqrt(2 df); 5 sd is far for a uniform sampler
        df = len(subsets) - 1
        chi2 = sum((c - expected) ** 2 / expected for c in subsets.values())
        assert chi2 < df + 5 * (2 * df) ** 0.5
    counts = torch.bincount(offsets.flatten(), minlength=pool).double()
    expected = n * m / pool
    assert bool(((counts - expected).abs() < 0.15 * expected).all())


def test_sample_distinct_takes_the_whole_pool_when_it_is_small():
    pool = torch.tensor([[0, 1, 3], [5, 6, 100]])
    offsets, keep = sample_distinct(pool, 5, torch.Generator().manual_seed(0))
    assert keep.sum(-1).tolist() == [[0, 1, 3], [5, 5, 5]]
    assert offsets[0, 2][keep[0, 2]].tolist() == [0, 1, 2]
    for row in offsets[1]:
        assert len(set(row.tolist())) == 5


def test_bad_arguments_name_the_argument():
    q, k, v = _qkv(1, 2, 2, 1, 8)
    with pytest.raises(ValueError, match="local"):
        sparse_decode(q, k, v, window=2, local=0)
    with pytest.raises(ValueError, match="window"):
        sparse_decode(q, k, v, window=-1)
    with pytest.raises(ValueError, match="valid"):
        sparse_decode(q, k, v, torch.ones(1, 7, dtype=torch.bool), window=2)
    with pytest.raises(ValueError, match="decode"):
        MultiHeadAttention(16, 2, method="stochastic", options={"decode": "sparse"})
    with pytest.raises(ValueError, match="'decode' is an option of stochastic"):
        MultiHeadAttention(16, 2, method="sliding_window", options={"decode": "stochastic"})
    with pytest.raises(ValueError, match="decode='stochastic'"):
        SALlamaConfig(attention_methods="full", attention_options={"decode": "stochastic"})


def test_hf_sampled_decode_matches_the_reference_with_its_seed():
    cfg = PatchConfig(method="stochastic", window=4, sinks=1, local=2, seed=5,
                      decode="stochastic")
    q, k, v = _qkv(2, 4, 2, 1, 33)
    valid = _left_padded((33, 18), 33)
    out = _with_cache(cfg, 3, q, k, v, valid, 0.5, None)
    draw = _draw(q, valid, window=4, sinks=1, local=2, seed=5, layer_idx=3)
    ref = sparse_decode_reference(q, k, v, valid, draw, sinks=1, local=2, scale=0.5)
    torch.testing.assert_close(out, ref)


def _decode_steps(layer, x, prompt):
    """Prefill ``prompt`` positions, then feed the rest one position at a time."""
    cache = KVCache()
    outs = [layer(x[:, :prompt], cache=cache)]
    outs += [layer(x[:, i:i + 1], cache=cache) for i in range(prompt, x.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("method,extra", [("stochastic", {}), ("gated", {}),
                                          ("stochastic_local", {"local": 2}),
                                          ("bigbird", {"random_keys": 2})])
def test_layer_stochastic_decode(method, extra):
    torch.manual_seed(0)
    x = torch.randn(1, 30, 32)
    options = dict(window=3, sinks=1, **extra)

    def layers(options):
        full = MultiHeadAttention(32, 4, method=method, options=options, num_kv_heads=2)
        sparse = MultiHeadAttention(32, 4, method=method, num_kv_heads=2,
                                    options=dict(options, decode="stochastic"))
        return full.eval(), sparse.eval()

    full, sparse = layers(options)
    sparse.load_state_dict(full.state_dict())
    with torch.no_grad():
        a, b = _decode_steps(full, x, 10), _decode_steps(sparse, x, 10)
        torch.testing.assert_close(b[:, :10], a[:, :10])  # the prefill is unchanged
        assert not torch.allclose(b[:, 10:], a[:, 10:], atol=1e-4)
        torch.testing.assert_close(_decode_steps(sparse, x, 10), b)  # seeded: reproducible
    # a budget covering the whole cache decodes like full attention
    full_wide, sparse_wide = layers(dict(options, window=64))
    sparse_wide.load_state_dict(full_wide.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_decode_steps(sparse_wide, x, 10),
                                   _decode_steps(full_wide, x, 10), atol=1e-5, rtol=1e-5)


def test_sa_llama_forwards_decode_to_its_stochastic_layers_and_generates():
    cfg = SALlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, attention_methods=["stochastic", "sliding_window"],
                        attention_options=dict(window=4, decode="stochastic"), eos_token_id=None)
    model = SALlamaForCausalLM(cfg).eval()
    layers = [layer.self_attn for layer in model.model.layers]
    assert [a.options.to_dict().get("decode") for a in layers] == ["stochastic", None]
    wide = SALlamaForCausalLM(SALlamaConfig(**{
        **cfg.to_dict(), "attention_options": dict(window=64, decode="stochastic")})).eval()
    wide_full = SALlamaForCausalLM(SALlamaConfig(**{
        **cfg.to_dict(), "attention_options": dict(window=64, decode="full")})).eval()
    wide_full.load_state_dict(wide.state_dict())
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(wide.generate(ids, **kw), wide_full.generate(ids, **kw))
        out = model.generate(ids, **kw)
    assert out.shape == (1, 18)


@pytest.mark.parametrize("window,sinks,lengths", [(5, 2, (40, 17)), (1, 0, (40, 40)),
                                                  (64, 3, (40, 2))])
def test_no_random_keys_is_the_cached_sliding_window(window, sinks, lengths):
    # the gated layer's SWA branch decodes this way with decode="stochastic"
    q, k, v = _qkv(2, 4, 2, 2, 40, seed=5)
    valid = _left_padded(lengths, 40)
    out = sparse_decode(q, k, v, valid, window=0, sinks=sinks, local=window)
    torch.testing.assert_close(out, cached_attention(q, k, v, window, sinks, valid))
