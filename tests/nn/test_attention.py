"""The attention layer against a slow dense reference built from patterns.dense_mask."""

from __future__ import annotations

import pytest
import torch

from stochastic_attention.nn import KVCache, MultiHeadAttention
from stochastic_attention.ops.patterns import dense_mask
from stochastic_attention.testing import assert_matches_reference, projected_qkv

FLOAT64_TOL = dict(atol=1e-7, grad_atol=1e-7, rtol=1e-7)  # torch.testing.assert_close's defaults


def slow_attention(layer, x, window, perm, sinks=0, key_mask=None, layout="band"):
    """Projections, RoPE and dense masked softmax attention, written out in full."""
    B, n, _ = x.shape
    H, Hk, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(B, n, H, D).transpose(1, 2)
    k = layer.k_proj(x).view(B, n, Hk, D).transpose(1, 2)
    v = layer.v_proj(x).view(B, n, Hk, D).transpose(1, 2)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    q, k = layer.rotary(q, k, torch.arange(n)[None])
    k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    mask = dense_mask(n, window, perm=perm, layout=layout, sinks=sinks,
                      key_mask=key_mask)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1))  # rows with no key give zeros
    return weights @ v


def dense_layer(layer, x, perm, key_mask=None):
    """The layer's output from slow_attention: its method's masks and gate, written out."""
    ref_perm = None if perm is None else perm.expand(x.shape[0], 1, -1)
    n = x.shape[1]
    o = layer.options
    if layer.method == "full":
        mixed = slow_attention(layer, x, n, None, key_mask=key_mask)
    elif layer.method == "sliding_window":
        mixed = slow_attention(layer, x, o.window, None, o.sinks, key_mask)
    else:
        mixed = slow_attention(layer, x, o.window, ref_perm, o.sinks, key_mask, o.layout)
        if layer.method == "gated":
            sliding = slow_attention(layer, x, o.sliding_window, None, o.sinks, key_mask)
            mixed = layer.gate(x, mixed, sliding)
    return layer.o_proj(mixed.transpose(1, 2).reshape(x.shape[0], n, -1))


@pytest.mark.parametrize("method,kw", [
    ("full", {}),
    ("sliding_window", {"sinks": 2}),
    ("stochastic", {"qk_norm": True}),
    ("stochastic", {"layout": "block", "window": 4}),
    ("gated", {"window": 7, "local_window": 3, "gate_granularity": "channel"}),
    ("gated", {"gate": "softmax", "sinks": 1}),
])
def test_outputs_and_gradients_match_dense_reference(method, kw, layers):
    layer = layers.make(method, **kw)
    x = torch.randn(2, 19, layers.hidden, dtype=torch.double, requires_grad=True)
    perm = layer.draw_permutation(2, 19) if layer.uses_permutation else None
    padding = torch.ones(2, 19, dtype=torch.bool)
    padding[1, :3] = False  # left padding in one sample
    # gradients with respect to the input and every parameter (the functions use the layer's own)
    assert_matches_reference(lambda x, *_: layer(x, perm=perm, attention_mask=padding),
                             lambda x, *_: dense_layer(layer, x, perm, padding),
                             (x, *layer.parameters()), **FLOAT64_TOL)


@pytest.mark.parametrize("bias,branch", [((30.0, -30.0), "stochastic"),
                                         ((-30.0, 30.0), "sliding_window")])
def test_forced_gates_reproduce_a_pure_branch(bias, branch, layers):
    gated = layers.make("gated", gate_bias=bias)
    torch.nn.init.zeros_(gated.gate.proj.weight)
    pure = layers.make(branch)
    pure.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k})
    x = torch.randn(2, 23, layers.hidden, dtype=torch.double)
    perm = gated.draw_permutation(2, 23)
    torch.testing.assert_close(gated(x, perm=perm), pure(x, perm=perm), atol=1e-9, rtol=1e-9)


def test_training_draws_fresh_permutations_and_eval_is_seeded(layers):
    layer = layers.make("stochastic")
    x = torch.randn(1, 32, layers.hidden, dtype=torch.double)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    other_layer = layers.make("stochastic", layer_idx=1).eval()
    assert not torch.equal(layer.draw_permutation(1, 32), other_layer.draw_permutation(1, 32))


@pytest.mark.parametrize("method", ["full", "sliding_window", "gated"])
def test_kv_cache_decoding_equals_full_forward(method, layers):
    # SA decodes with full attention over the cache: with a window covering the sequence the
    # full forward is the same computation, so prefill + decoding must reproduce it.
    n = 13
    kw = {"full": {}, "sliding_window": {"window": 4},
          "gated": {"window": n, "local_window": 4}}[method]
    layer = layers.make(method, **kw).eval()
    x = torch.randn(2, n, layers.hidden, dtype=torch.double)
    full = layer(x)
    cache = KVCache()
    steps = [layer(x[:, :6], cache=cache)]
    steps += [layer(x[:, i:i + 1], cache=cache) for i in range(6, n)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_bad_arguments_name_the_fix(layers):
    with pytest.raises(ValueError, match="method"):
        MultiHeadAttention(layers.hidden, layers.heads, method="linear")
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(layers.hidden, layers.heads, num_kv_heads=3)
    with pytest.raises(ValueError, match="window"):
        MultiHeadAttention(layers.hidden, layers.heads, method="sliding_window", options={"window": 0})
    with pytest.raises(ValueError, match="gate"):
        MultiHeadAttention(layers.hidden, layers.heads, method="gated", options={"gate": "tanh"})


def test_moba_with_every_block_selected_is_full_attention(layers):
    moba = layers.make("moba", block_size=4, top_k=100)
    full = layers.make("full")
    full.load_state_dict(moba.state_dict())
    x = torch.randn(2, 21, layers.hidden, dtype=torch.double)
    torch.testing.assert_close(moba(x), full(x))


def test_moba_matches_its_reference_operator(layers):
    from stochastic_attention.ops.moba import moba_reference

    layer = layers.make("moba", block_size=4, top_k=2, sinks=1)
    x = torch.randn(2, 21, layers.hidden, dtype=torch.double)
    q, k, v = projected_qkv(layer, x)
    mixed = moba_reference(q, k, v, 4, 2, sinks=1)
    ref = layer.o_proj(mixed.transpose(1, 2).reshape(2, 21, -1))
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("kw", [{}, {"window": 6}, {"window": 6, "windows": "stochastic"}])
def test_fractional_matches_its_reference_operator(kw, layers):
    from stochastic_attention.ops.fractional import fractional_attention

    layer = layers.make("fractional", alpha=1.5, **kw).eval()
    x = torch.randn(2, 17, layers.hidden, dtype=torch.double, requires_grad=True)
    perm = layer.draw_permutation(2, 17) if layer.uses_permutation else None

    def reference(x):
        q, k, v = projected_qkv(layer, x)
        mixed = fractional_attention(q, k, v, 1.5, causal=True, window=kw.get("window"),
                                     perm=perm, backend="reference")
        return layer.o_proj(mixed.transpose(1, 2).reshape(2, 17, -1))

    assert_matches_reference(lambda x: layer(x, perm=perm), reference, (x,), **FLOAT64_TOL)
