"""The attention layer against a slow dense reference built from patterns.dense_mask."""

from __future__ import annotations

import pytest
import torch

from stochastic_attention.nn import OPTIONS, KVCache, MultiHeadAttention
from stochastic_attention.ops.patterns import dense_mask

HIDDEN, HEADS, KV_HEADS = 24, 4, 2  # head_dim 6, GQA groups of 2
LAYER_KEYWORDS = ("qk_norm", "layer_idx", "backend")  # the rest are the method's options


def make(method: str, **kw) -> MultiHeadAttention:
    torch.manual_seed(0)
    layer_kw = {name: kw.pop(name) for name in LAYER_KEYWORDS if name in kw}
    if "window" in OPTIONS[method].names() and method != "fractional":
        kw.setdefault("window", 5)  # fractional's default (None) is full attention
    return MultiHeadAttention(HIDDEN, HEADS, num_kv_heads=KV_HEADS, method=method, options=kw,
                              **layer_kw).double()


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


def module_vs_reference(layer, x, perm, key_mask=None):
    out = layer(x, perm=perm, attention_mask=key_mask)
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
    ref = layer.o_proj(mixed.transpose(1, 2).reshape(x.shape[0], n, -1))
    return out, ref


@pytest.mark.parametrize("method,kw", [
    ("full", {}),
    ("sliding_window", {"sinks": 2}),
    ("stochastic", {"qk_norm": True}),
    ("stochastic", {"layout": "block", "window": 4}),
    ("gated", {"window": 7, "local_window": 3, "gate_granularity": "channel"}),
    ("gated", {"gate": "softmax", "sinks": 1}),
])
def test_outputs_and_gradients_match_dense_reference(method, kw):
    layer = make(method, **kw)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.double, requires_grad=True)
    perm = layer.draw_permutation(2, 19) if layer.uses_permutation else None
    padding = torch.ones(2, 19, dtype=torch.bool)
    padding[1, :3] = False  # left padding in one sample
    out, ref = module_vs_reference(layer, x, perm, padding)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], g, allow_unused=True)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a))


@pytest.mark.parametrize("bias,branch", [((30.0, -30.0), "stochastic"),
                                         ((-30.0, 30.0), "sliding_window")])
def test_forced_gates_reproduce_a_pure_branch(bias, branch):
    gated = make("gated", gate_bias=bias)
    torch.nn.init.zeros_(gated.gate.proj.weight)
    pure = make(branch)
    pure.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k})
    x = torch.randn(2, 23, HIDDEN, dtype=torch.double)
    perm = gated.draw_permutation(2, 23)
    torch.testing.assert_close(gated(x, perm=perm), pure(x, perm=perm), atol=1e-9, rtol=1e-9)


def test_training_draws_fresh_permutations_and_eval_is_seeded():
    layer = make("stochastic")
    x = torch.randn(1, 32, HIDDEN, dtype=torch.double)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    other_layer = make("stochastic", layer_idx=1).eval()
    assert not torch.equal(layer.draw_permutation(1, 32), other_layer.draw_permutation(1, 32))


@pytest.mark.parametrize("method", ["full", "sliding_window", "gated"])
def test_kv_cache_decoding_equals_full_forward(method):
    # SA decodes with full attention over the cache: with a window covering the sequence the
    # full forward is the same computation, so prefill + decoding must reproduce it.
    n = 13
    kw = {"full": {}, "sliding_window": {"window": 4},
          "gated": {"window": n, "local_window": 4}}[method]
    layer = make(method, **kw).eval()
    x = torch.randn(2, n, HIDDEN, dtype=torch.double)
    full = layer(x)
    cache = KVCache()
    steps = [layer(x[:, :6], cache=cache)]
    steps += [layer(x[:, i:i + 1], cache=cache) for i in range(6, n)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="method"):
        MultiHeadAttention(HIDDEN, HEADS, method="linear")
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(HIDDEN, HEADS, num_kv_heads=3)
    with pytest.raises(ValueError, match="window"):
        MultiHeadAttention(HIDDEN, HEADS, method="sliding_window", options={"window": 0})
    with pytest.raises(ValueError, match="gate"):
        MultiHeadAttention(HIDDEN, HEADS, method="gated", options={"gate": "tanh"})


def _projected(layer, x):
    """q, k, v of the layer after projections and RoPE (no cache, positions 0..n-1)."""
    B, n, _ = x.shape
    q = layer.q_proj(x).view(B, n, layer.num_heads, layer.head_dim).transpose(1, 2)
    k = layer.k_proj(x).view(B, n, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    v = layer.v_proj(x).view(B, n, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    q, k = layer.rotary(q, k, torch.arange(n)[None])
    return q, k, v


def test_moba_with_every_block_selected_is_full_attention():
    moba = make("moba", block_size=4, top_k=100)
    full = make("full")
    full.load_state_dict(moba.state_dict())
    x = torch.randn(2, 21, HIDDEN, dtype=torch.double)
    torch.testing.assert_close(moba(x), full(x))


def test_moba_matches_its_reference_operator():
    from stochastic_attention.ops.moba import moba_reference

    layer = make("moba", block_size=4, top_k=2, sinks=1)
    x = torch.randn(2, 21, HIDDEN, dtype=torch.double)
    q, k, v = _projected(layer, x)
    mixed = moba_reference(q, k, v, 4, 2, sinks=1)
    ref = layer.o_proj(mixed.transpose(1, 2).reshape(2, 21, -1))
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("kw", [{}, {"window": 6}, {"window": 6, "windows": "stochastic"}])
def test_fractional_matches_its_reference_operator(kw):
    from stochastic_attention.ops.fractional import fractional_attention

    layer = make("fractional", alpha=1.5, **kw).eval()
    x = torch.randn(2, 17, HIDDEN, dtype=torch.double, requires_grad=True)
    perm = layer.draw_permutation(2, 17) if layer.uses_permutation else None
    q, k, v = _projected(layer, x)
    mixed = fractional_attention(q, k, v, 1.5, causal=True, window=kw.get("window"),
                                 perm=perm, backend="reference")
    ref = layer.o_proj(mixed.transpose(1, 2).reshape(2, 17, -1))
    out = layer(x, perm=perm)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0],
                               torch.autograd.grad(ref.sum(), x)[0])
