"""The "stochastic_local" and "bigbird" methods, their SA-Llama config options, and the
per-method attention budget (mean attended keys) against dense masks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import stochastic_attention as sa
from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM
from stochastic_attention.nn import KVCache, MultiHeadAttention
from stochastic_attention.nn.budget import BUDGET_SEEDS, mean_attended_keys
from stochastic_attention.ops.bigbird import bigbird_indices, bigbird_mask, bigbird_reference
from stochastic_attention.ops.moba import chosen_blocks
from stochastic_attention.ops.patterns import dense_mask
from stochastic_attention.ops.reference import masked_attention
from stochastic_attention.testing import assert_matches_reference, projected_qkv

# The union and BigBird merge their parts in fp32 (attend_with_lse), even for fp64 inputs.
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(TOL, grad_atol=1e-5)  # outputs and gradients
UNION_METHODS = {"stochastic_local": {"local": 3}, "bigbird": {"random_keys": 4, "sinks": 1}}


def left_padding(batch: int, n: int) -> torch.Tensor:
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, :3] = False
    return mask


def mixed(layer, x, mask):
    """The layer's output computed from its projections and a dense mask [B|1, H|1, n, n]."""
    q, k, v = projected_qkv(layer, x)
    groups = layer.num_heads // layer.num_kv_heads
    out = masked_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                           mask, layer.head_dim**-0.5)
    return layer.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("layout,sinks", [("band", 0), ("block", 2)])
def test_stochastic_local_layer_matches_dense_union(layout, sinks, layers):
    layer = layers.make("stochastic_local", local=3, sinks=sinks, layout=layout, perm_per_head=True)
    x = torch.randn(2, 21, layers.hidden, dtype=torch.double, requires_grad=True)
    padding = left_padding(2, 21)
    perm = layer.draw_permutation(2, 21)
    mask = dense_mask(21, layer.options.window, perm=perm, layout=layout, sinks=sinks,
                      key_mask=padding, local=3)
    # gradients with respect to the input and every parameter (the functions use the layer's own)
    assert_matches_reference(lambda x, *_: layer(x, perm=perm, attention_mask=padding),
                             lambda x, *_: mixed(layer, x, mask), (x, *layer.parameters()), **GRAD_TOL)


@pytest.mark.parametrize("per_head", [False, True])
def test_bigbird_layer_matches_dense_reference(per_head, layers):
    layer = layers.make("bigbird", window=3, random_keys=4, sinks=2, perm_per_head=per_head).eval()
    x = torch.randn(2, 25, layers.hidden, dtype=torch.double, requires_grad=True)
    padding = left_padding(2, 25)
    out = layer(x, attention_mask=padding)  # eval: the seeded draw below
    idx = layer.draw_random_keys(2, 25, key_mask=padding)
    assert idx.shape == (2, layers.heads if per_head else 1, 25, 4)

    def reference(x, *_):
        q, k, v = projected_qkv(layer, x)
        mixed_ref = bigbird_reference(q, k, v, 3, 4, sinks=2, key_mask=padding, indices=idx)
        return layer.o_proj(mixed_ref.transpose(1, 2).reshape(2, 25, -1))

    assert_matches_reference(lambda x, *_: layer(x, attention_mask=padding), reference,
                             (x, *layer.parameters()), **GRAD_TOL)
    # Independent of the operator: the dense mask of the same draw.
    mask = bigbird_mask(25, 3, idx, sinks=2, key_mask=padding)
    torch.testing.assert_close(out, mixed(layer, x, mask), **TOL)


@pytest.mark.parametrize("method", UNION_METHODS)
def test_training_redraws_and_eval_is_seeded(method, layers):
    layer = layers.make(method, window=4, **UNION_METHODS[method])
    x = torch.randn(2, 40, layers.hidden, dtype=torch.double, requires_grad=True)
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
    other = layers.make(method, window=4, layer_idx=1, **UNION_METHODS[method]).eval()
    assert not torch.equal(other(x), layer(x))  # layers draw independently
    reseeded = layers.make(method, window=4, perm_seed=1, **UNION_METHODS[method]).eval()
    assert not torch.equal(reseeded(x), layer(x))


@pytest.mark.parametrize("method", UNION_METHODS)
def test_kv_cache_decoding_is_full_attention_over_the_cache(method, layers):
    n = 15
    layer = layers.make(method, window=3, **UNION_METHODS[method]).eval()
    full = layers.make("full").eval()  # same seed, same shapes: same weights
    x = torch.randn(2, n, layers.hidden, dtype=torch.double)
    cache, ref_cache = KVCache(), KVCache()
    layer(x[:, :8], cache=cache)
    full(x[:, :8], cache=ref_cache)
    for i in range(8, n):
        torch.testing.assert_close(layer(x[:, i:i + 1], cache=cache),
                                   full(x[:, i:i + 1], cache=ref_cache))


def test_method_options_are_refused_where_they_are_ignored(layers):
    with pytest.raises(ValueError, match="local"):
        MultiHeadAttention(layers.hidden, layers.heads, method="stochastic", options={"local": 4})
    with pytest.raises(TypeError, match="local"):
        MultiHeadAttention(layers.hidden, layers.heads, method="stochastic_local")  # local has no default
    with pytest.raises(ValueError, match="local must be >= 1"):
        MultiHeadAttention(layers.hidden, layers.heads, method="stochastic_local", options={"local": 0})
    with pytest.raises(ValueError, match="random_keys"):
        MultiHeadAttention(layers.hidden, layers.heads, method="sliding_window", options={"random_keys": 2})
    with pytest.raises(ValueError, match="random_keys"):
        MultiHeadAttention(layers.hidden, layers.heads, method="bigbird", options={"random_keys": -1})
    with pytest.raises(ValueError, match="local"):
        SALlamaConfig(num_hidden_layers=2, attention_methods=["stochastic", "full"],
                      attention_options={"local": 4})
    with pytest.raises(ValueError, match="random_keys"):
        SALlamaConfig(num_hidden_layers=1, attention_methods="stochastic_local",
                      attention_options={"local": 2, "random_keys": 3})


def tiny(methods, **options) -> SALlamaForCausalLM:
    torch.manual_seed(0)
    config = SALlamaConfig(hidden_size=32, num_hidden_layers=len(methods), num_attention_heads=4,
                           num_key_value_heads=2, attention_methods=methods,
                           attention_options=dict(window=5, **options))
    return SALlamaForCausalLM(config)


@pytest.mark.parametrize("method", UNION_METHODS)
def test_sa_llama_trains_with_each_union_method(method):
    model = tiny([method, method], **UNION_METHODS[method]).train()
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


def test_config_roundtrip_keeps_methods_and_options(tmp_path):
    methods = ["stochastic_local", "bigbird", "full"]
    model = tiny(methods, local=3, random_keys=6, sinks=1, perm_per_head=True).eval()
    layers = [layer.self_attn for layer in model.model.layers]
    assert [(getattr(a.options, "local", 0), getattr(a.options, "random_keys", 0))
            for a in layers] == [(3, 0), (0, 6), (0, 0)]
    assert layers[0].options.perm_per_head and layers[1].options.sinks == 1
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.attention_methods == methods
    assert config.attention_options == dict(window=5, local=3, random_keys=6, sinks=1,
                                            perm_per_head=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 257, (2, 40))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ---- the attention budget -------------------------------------------------------------------

N = 37
# One mapping for every method: each takes the options it has (as SALlamaConfig does).
OPTIONS = dict(window=6, local_window=4, sinks=2, local=3, random_keys=5, block_size=8,
               top_k=3)


def seeded_mean(mask_of_seed) -> float:
    return sum(float(mask_of_seed(torch.Generator().manual_seed(s)).sum(-1).float().mean())
               for s in range(BUDGET_SEEDS)) / BUDGET_SEEDS


def dense_budget(method: str, o: dict, layout: str = "band") -> float:
    """The mean row sum of each method's dense mask, built independently of the counters."""
    def perm(g):
        return sa.random_permutation(1, 1, N, generator=g)

    if method == "full":
        return float(torch.ones(N, N).tril().sum(-1).mean())
    if method == "sliding_window":
        return float(dense_mask(N, o["window"], sinks=o["sinks"]).sum(-1).float().mean())
    if method == "stochastic":
        return seeded_mean(lambda g: dense_mask(N, o["window"], perm=perm(g), layout=layout,
                                                sinks=o["sinks"]))
    if method == "stochastic_local":
        return seeded_mean(lambda g: dense_mask(N, o["window"], perm=perm(g), layout=layout,
                                                sinks=o["sinks"], local=o["local"]))
    if method == "gated":
        return seeded_mean(lambda g: dense_mask(N, o["window"], perm=perm(g), layout=layout,
                                                sinks=o["sinks"])
                           | dense_mask(N, o["local_window"], sinks=o["sinks"]))
    if method == "bigbird":
        return seeded_mean(lambda g: bigbird_mask(
            N, o["window"], bigbird_indices(1, 1, N, o["window"], o["random_keys"],
                                            sinks=o["sinks"], generator=g), sinks=o["sinks"]))
    if method == "fractional":
        return float(dense_mask(N, o["window"]).sum(-1).float().mean())
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["full", "sliding_window", "stochastic", "stochastic_local",
                                    "gated", "bigbird", "fractional"])
def test_mean_attended_keys_equals_dense_mask_row_sums(method):
    assert mean_attended_keys(OPTIONS, method, N) == pytest.approx(dense_budget(method, OPTIONS))


def test_mean_attended_keys_block_layout_and_sources_agree(layers):
    block = dict(OPTIONS, layout="block")
    for method in ("stochastic", "stochastic_local"):
        assert mean_attended_keys(block, method, N) == pytest.approx(
            dense_budget(method, block, layout="block"))
    config = SALlamaConfig(num_hidden_layers=2, attention_methods=["stochastic_local", "bigbird"],
                           attention_options={k: v for k, v in OPTIONS.items()
                                              if k in ("window", "sinks", "local", "random_keys")})
    layer = MultiHeadAttention(layers.hidden, layers.heads, num_kv_heads=layers.kv_heads, method="bigbird",
                               options={k: OPTIONS[k] for k in ("window", "random_keys", "sinks")})
    for method in ("stochastic_local", "bigbird", "sliding_window", "stochastic"):
        assert mean_attended_keys(config, method, N) == mean_attended_keys(OPTIONS, method, N)
    for method in ("bigbird", "sliding_window"):
        assert mean_attended_keys(layer, method, N) == mean_attended_keys(OPTIONS, method, N)
        assert mean_attended_keys(layer.options, method, N) == mean_attended_keys(OPTIONS,
                                                                                  method, N)


@pytest.mark.parametrize("sinks", [0, 2])
def test_mean_attended_keys_moba_against_its_dense_mask(sinks):
    # MoBA's choice depends on the data, its count does not (earlier blocks are full); sinks
    # inside a chosen earlier block make the budget an upper bound.
    o = dict(OPTIONS, sinks=sinks, block_size=4, top_k=3)
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
    with pytest.raises(ValueError, match="'dense' was renamed: use 'full'"):
        mean_attended_keys(OPTIONS, "dense", 10)
    with pytest.raises(ValueError, match="method"):
        mean_attended_keys(OPTIONS, "linear", 10)
    with pytest.raises(ValueError, match="seq_len"):
        mean_attended_keys(OPTIONS, "stochastic", 0)
    with pytest.raises(TypeError, match="SALlamaConfig"):
        mean_attended_keys([1, 2], "stochastic", 10)
    with pytest.raises(ValueError, match="'moba_topk' was renamed: use 'top_k'"):
        mean_attended_keys({"moba_topk": 2}, "moba", 10)
