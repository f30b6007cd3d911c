"""The "sa_local" and "bigbird" layer kinds, their SA-Llama config options, and the per-kind
attention budget (mean attended keys) against dense masks."""

from __future__ import annotations

import pytest
import torch
from test_nn_attention import HEADS, HIDDEN, KV_HEADS, _projected, make
from transformers import AutoConfig, AutoModelForCausalLM

import stochastic_attention as sa
from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM
from stochastic_attention.nn import KVCache, MultiHeadAttention
from stochastic_attention.nn.budget import BUDGET_SEEDS, mean_attended_keys
from stochastic_attention.ops.bigbird import bigbird_indices, bigbird_mask, bigbird_reference
from stochastic_attention.ops.moba import chosen_blocks
from stochastic_attention.ops.patterns import dense_mask
from stochastic_attention.ops.reference import masked_attention

# The union and BigBird merge their parts in fp32 (attend_with_lse), even for fp64 inputs.
TOL = dict(rtol=1e-5, atol=1e-5)
NEW_KINDS = {"sa_local": {"local": 3}, "bigbird": {"random_keys": 4, "sinks": 1}}


def left_padding(batch: int, n: int) -> torch.Tensor:
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, :3] = False
    return mask


def mixed(layer, x, mask):
    """The layer's output computed from its projections and a dense mask [B|1, H|1, n, n]."""
    q, k, v = _projected(layer, x)
    groups = layer.num_heads // layer.num_kv_heads
    out = masked_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                           mask, layer.head_dim**-0.5)
    return layer.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("layout,sinks", [("band", 0), ("block", 2)])
def test_sa_local_layer_matches_dense_union(layout, sinks):
    layer = make("sa_local", local=3, sinks=sinks, layout=layout, perm_per_head=True)
    x = torch.randn(2, 21, HIDDEN, dtype=torch.double, requires_grad=True)
    padding = left_padding(2, 21)
    perm = layer.draw_permutation(2, 21)
    out = layer(x, perm=perm, attention_mask=padding)
    mask = dense_mask(21, layer.sa_window, perm=perm, layout=layout, sinks=sinks,
                      key_mask=padding, local=3)
    ref = mixed(layer, x, mask)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *layer.parameters()], g),
                    torch.autograd.grad(ref, [x, *layer.parameters()], g), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("per_head", [False, True])
def test_bigbird_layer_matches_dense_reference(per_head):
    layer = make("bigbird", window=3, random_keys=4, sinks=2, perm_per_head=per_head).eval()
    x = torch.randn(2, 25, HIDDEN, dtype=torch.double, requires_grad=True)
    padding = left_padding(2, 25)
    out = layer(x, attention_mask=padding)  # eval: the seeded draw below
    idx = layer.draw_random_keys(2, 25, key_mask=padding)
    assert idx.shape == (2, HEADS if per_head else 1, 25, 4)
    q, k, v = _projected(layer, x)
    mixed_ref = bigbird_reference(q, k, v, 3, 4, sinks=2, key_mask=padding, indices=idx)
    ref = layer.o_proj(mixed_ref.transpose(1, 2).reshape(2, 25, -1))
    torch.testing.assert_close(out, ref, **TOL)
    # Independent of the operator: the dense mask of the same draw.
    mask = bigbird_mask(25, 3, idx, sinks=2, key_mask=padding)
    torch.testing.assert_close(out, mixed(layer, x, mask), **TOL)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *layer.parameters()], g),
                    torch.autograd.grad(ref, [x, *layer.parameters()], g), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_training_redraws_and_eval_is_seeded(kind):
    layer = make(kind, window=4, **NEW_KINDS[kind])
    x = torch.randn(2, 40, HIDDEN, dtype=torch.double, requires_grad=True)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    first.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.manual_seed(3)  # training draws come from torch's global RNG: seeding reproduces them
    first = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    other = make(kind, window=4, layer_idx=1, **NEW_KINDS[kind]).eval()
    assert not torch.equal(other(x), layer(x))  # layers draw independently
    reseeded = make(kind, window=4, perm_seed=1, **NEW_KINDS[kind]).eval()
    assert not torch.equal(reseeded(x), layer(x))


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_kv_cache_decoding_is_full_attention_over_the_cache(kind):
    n = 15
    layer = make(kind, window=3, **NEW_KINDS[kind]).eval()
    full = make("full").eval()  # same seed, same shapes: same weights
    x = torch.randn(2, n, HIDDEN, dtype=torch.double)
    cache, ref_cache = KVCache(), KVCache()
    layer(x[:, :8], cache=cache)
    full(x[:, :8], cache=ref_cache)
    for i in range(8, n):
        torch.testing.assert_close(layer(x[:, i:i + 1], cache=cache),
                                   full(x[:, i:i + 1], cache=ref_cache))


def test_kind_options_are_refused_where_they_are_ignored():
    with pytest.raises(ValueError, match="local"):
        MultiHeadAttention(HIDDEN, HEADS, kind="sa", local=4)
    with pytest.raises(ValueError, match="local >= 1"):
        MultiHeadAttention(HIDDEN, HEADS, kind="sa_local")
    with pytest.raises(ValueError, match="random_keys"):
        MultiHeadAttention(HIDDEN, HEADS, kind="swa", random_keys=2)
    with pytest.raises(ValueError, match="random_keys"):
        MultiHeadAttention(HIDDEN, HEADS, kind="bigbird", random_keys=-1)
    with pytest.raises(ValueError, match="local"):
        SALlamaConfig(num_hidden_layers=2, attention_kinds=["sa", "full"], local=4)
    with pytest.raises(ValueError, match="random_keys"):
        SALlamaConfig(num_hidden_layers=1, attention_kinds="sa_local", local=2, random_keys=3)


def tiny(kinds, **kw) -> SALlamaForCausalLM:
    torch.manual_seed(0)
    config = SALlamaConfig(hidden_size=32, num_hidden_layers=len(kinds), num_attention_heads=4,
                           num_key_value_heads=2, attention_kinds=kinds, window=5, **kw)
    return SALlamaForCausalLM(config)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_sa_llama_trains_with_each_new_kind(kind):
    model = tiny([kind, kind], **NEW_KINDS[kind]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    assert losses[-1] < losses[0]


def test_config_roundtrip_keeps_kinds_and_options(tmp_path):
    kinds = ["sa_local", "bigbird", "full"]
    model = tiny(kinds, local=3, random_keys=6, sinks=1, perm_per_head=True).eval()
    layers = [layer.self_attn for layer in model.model.layers]
    assert [(a.local, a.random_keys) for a in layers] == [(3, 0), (0, 6), (0, 0)]
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.attention_kinds == kinds
    assert (config.local, config.random_keys, config.sinks) == (3, 6, 1)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 257, (2, 40))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ---- the attention budget -------------------------------------------------------------------

N = 37
OPTIONS = dict(window=6, sa_window=7, swa_window=4, sinks=2, local=3, random_keys=5,
               moba_block_size=8, moba_topk=3, fna_window=5)


def seeded_mean(mask_of_seed) -> float:
    return sum(float(mask_of_seed(torch.Generator().manual_seed(s)).sum(-1).float().mean())
               for s in range(BUDGET_SEEDS)) / BUDGET_SEEDS


def dense_budget(kind: str, o: dict, layout: str = "band") -> float:
    """The mean row sum of each kind's dense mask, built independently of the counters."""
    def perm(g):
        return sa.random_permutation(1, 1, N, generator=g)

    if kind == "full":
        return float(torch.ones(N, N).tril().sum(-1).mean())
    if kind == "swa":
        return float(dense_mask(N, o["swa_window"], sinks=o["sinks"]).sum(-1).float().mean())
    if kind == "sa":
        return seeded_mean(lambda g: dense_mask(N, o["sa_window"], perm=perm(g), layout=layout,
                                                sinks=o["sinks"]))
    if kind == "sa_local":
        return seeded_mean(lambda g: dense_mask(N, o["sa_window"], perm=perm(g), layout=layout,
                                                sinks=o["sinks"], local=o["local"]))
    if kind == "gated":
        return seeded_mean(lambda g: dense_mask(N, o["sa_window"], perm=perm(g), layout=layout,
                                                sinks=o["sinks"])
                           | dense_mask(N, o["swa_window"], sinks=o["sinks"]))
    if kind == "bigbird":
        return seeded_mean(lambda g: bigbird_mask(
            N, o["swa_window"], bigbird_indices(1, 1, N, o["swa_window"], o["random_keys"],
                                                sinks=o["sinks"], generator=g), sinks=o["sinks"]))
    if kind == "fna":
        return float(dense_mask(N, o["fna_window"]).sum(-1).float().mean())
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["full", "swa", "sa", "sa_local", "gated", "bigbird", "fna"])
def test_mean_attended_keys_equals_dense_mask_row_sums(kind):
    assert mean_attended_keys(OPTIONS, kind, N) == pytest.approx(dense_budget(kind, OPTIONS))


def test_mean_attended_keys_block_layout_and_sources_agree():
    block = dict(OPTIONS, layout="block")
    for kind in ("sa", "sa_local"):
        assert mean_attended_keys(block, kind, N) == pytest.approx(
            dense_budget(kind, block, layout="block"))
    config = SALlamaConfig(num_hidden_layers=2, attention_kinds=["sa_local", "bigbird"],
                           **OPTIONS)
    layer = MultiHeadAttention(HIDDEN, HEADS, num_kv_heads=KV_HEADS, kind="bigbird",
                               **{k: v for k, v in OPTIONS.items() if k != "local"})
    for kind in ("sa_local", "bigbird", "gated", "moba"):
        assert mean_attended_keys(config, kind, N) == mean_attended_keys(OPTIONS, kind, N)
    for kind in ("bigbird", "swa", "moba"):
        assert mean_attended_keys(layer, kind, N) == mean_attended_keys(OPTIONS, kind, N)


@pytest.mark.parametrize("sinks", [0, 2])
def test_mean_attended_keys_moba_against_its_dense_mask(sinks):
    # MoBA's choice depends on the data, its count does not (earlier blocks are full); sinks
    # inside a chosen earlier block make the budget an upper bound.
    o = dict(OPTIONS, sinks=sinks, moba_block_size=4, moba_topk=3)
    q, k = torch.randn(1, 2, N, 6), torch.randn(1, 2, N, 6)
    chosen = chosen_blocks(q, k, 4, 3, None)  # [1, 2, N, blocks]
    pos = torch.arange(N)
    vis = chosen[..., pos // 4] & (pos[None, :] <= pos[:, None])
    vis = vis | ((pos < sinks) & (pos[None, :] <= pos[:, None]))
    actual = float(vis.sum(-1).float().mean())
    budget = mean_attended_keys(o, "moba", N)
    if sinks == 0:
        assert budget == pytest.approx(actual)
    else:
        assert actual <= budget + 1e-9
        # Every query's own block and earlier-blocks count is fixed: only sinks may be shared.
        assert budget - actual <= sinks


def test_mean_attended_keys_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        mean_attended_keys(OPTIONS, "dense", 10)
    with pytest.raises(ValueError, match="seq_len"):
        mean_attended_keys(OPTIONS, "sa", 0)
    with pytest.raises(TypeError, match="SALlamaConfig"):
        mean_attended_keys([1, 2], "sa", 10)
