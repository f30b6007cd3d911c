"""The attention layer against a slow dense reference built from patterns.dense_mask."""

from __future__ import annotations

import pytest
import torch

from stochastic_attention.nn import KVCache, MultiHeadAttention
from stochastic_attention.ops.patterns import dense_mask

HIDDEN, HEADS, KV_HEADS = 24, 4, 2  # head_dim 6, GQA groups of 2


def make(kind: str, **kw) -> MultiHeadAttention:
    torch.manual_seed(0)
    kw.setdefault("window", 5)
    return MultiHeadAttention(HIDDEN, HEADS, num_kv_heads=KV_HEADS, kind=kind, **kw).double()


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
    if layer.kind == "full":
        mixed = slow_attention(layer, x, n, None, key_mask=key_mask)
    elif layer.kind == "swa":
        mixed = slow_attention(layer, x, layer.swa_window, None, layer.sinks, key_mask)
    else:
        mixed = slow_attention(layer, x, layer.sa_window, ref_perm, layer.sinks, key_mask,
                               layer.layout)
        if layer.kind == "gated":
            swa = slow_attention(layer, x, layer.swa_window, None, layer.sinks, key_mask)
            mixed = layer.gate(x, mixed, swa)
    ref = layer.o_proj(mixed.transpose(1, 2).reshape(x.shape[0], n, -1))
    return out, ref


@pytest.mark.parametrize("kind,kw", [
    ("full", {}),
    ("swa", {"sinks": 2}),
    ("sa", {"qk_norm": True}),
    ("sa", {"layout": "block", "window": 4}),
    ("gated", {"sa_window": 7, "swa_window": 3, "gate_granularity": "channel"}),
    ("gated", {"gate": "softmax", "sinks": 1}),
])
def test_outputs_and_gradients_match_dense_reference(kind, kw):
    layer = make(kind, **kw)
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


@pytest.mark.parametrize("bias,branch", [((30.0, -30.0), "sa"), ((-30.0, 30.0), "swa")])
def test_forced_gates_reproduce_a_pure_branch(bias, branch):
    gated = make("gated", gate_bias=bias)
    torch.nn.init.zeros_(gated.gate.proj.weight)
    pure = make(branch)
    pure.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k})
    x = torch.randn(2, 23, HIDDEN, dtype=torch.double)
    perm = gated.draw_permutation(2, 23)
    torch.testing.assert_close(gated(x, perm=perm), pure(x, perm=perm), atol=1e-9, rtol=1e-9)


def test_training_draws_fresh_permutations_and_eval_is_seeded():
    layer = make("sa")
    x = torch.randn(1, 32, HIDDEN, dtype=torch.double)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    other_layer = make("sa", layer_idx=1).eval()
    assert not torch.equal(layer.draw_permutation(1, 32), other_layer.draw_permutation(1, 32))


@pytest.mark.parametrize("kind", ["full", "swa", "gated"])
def test_kv_cache_decoding_equals_full_forward(kind):
    # SA decodes with full attention over the cache: with a window covering the sequence the
    # full forward is the same computation, so prefill + decoding must reproduce it.
    n = 13
    kw = {"sa_window": n, "swa_window": 4} if kind == "gated" else {"window": 4}
    layer = make(kind, **kw).eval()
    x = torch.randn(2, n, HIDDEN, dtype=torch.double)
    full = layer(x)
    cache = KVCache()
    steps = [layer(x[:, :6], cache=cache)]
    steps += [layer(x[:, i:i + 1], cache=cache) for i in range(6, n)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="kind"):
        MultiHeadAttention(HIDDEN, HEADS, kind="linear")
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(HIDDEN, HEADS, num_kv_heads=3)
    with pytest.raises(ValueError, match="window"):
        MultiHeadAttention(HIDDEN, HEADS, kind="swa", window=0)
    with pytest.raises(ValueError, match="gate"):
        MultiHeadAttention(HIDDEN, HEADS, kind="gated", gate="tanh")


def _projected(layer, x):
    """q, k, v of the layer after projections and RoPE (no cache, positions 0..n-1)."""
    B, n, _ = x.shape
    q = layer.q_proj(x).view(B, n, layer.num_heads, layer.head_dim).transpose(1, 2)
    k = layer.k_proj(x).view(B, n, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    v = layer.v_proj(x).view(B, n, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    q, k = layer.rotary(q, k, torch.arange(n)[None])
    return q, k, v


def test_moba_kind_with_every_block_selected_is_full_attention():
    moba = make("moba", moba_block_size=4, moba_topk=100)
    full = make("full")
    full.load_state_dict(moba.state_dict())
    x = torch.randn(2, 21, HIDDEN, dtype=torch.double)
    torch.testing.assert_close(moba(x), full(x))


def test_moba_kind_matches_its_reference_operator():
    from stochastic_attention.ops.moba import moba_reference

    layer = make("moba", moba_block_size=4, moba_topk=2, sinks=1)
    x = torch.randn(2, 21, HIDDEN, dtype=torch.double)
    q, k, v = _projected(layer, x)
    mixed = moba_reference(q, k, v, 4, 2, sinks=1)
    ref = layer.o_proj(mixed.transpose(1, 2).reshape(2, 21, -1))
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("kw", [{}, {"fna_window": 6}, {"fna_window": 6, "fna_stochastic": True}])
def test_fna_kind_matches_its_reference_operator(kw):
    from stochastic_attention.ops.fractional import fractional_attention

    layer = make("fna", fna_alpha=1.5, **kw).eval()
    x = torch.randn(2, 17, HIDDEN, dtype=torch.double, requires_grad=True)
    perm = layer.draw_permutation(2, 17) if layer.uses_permutation else None
    q, k, v = _projected(layer, x)
    mixed = fractional_attention(q, k, v, 1.5, causal=True, window=kw.get("fna_window"),
                                 perm=perm, backend="reference")
    ref = layer.o_proj(mixed.transpose(1, 2).reshape(2, 17, -1))
    out = layer(x, perm=perm)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0],
                               torch.autograd.grad(ref.sum(), x)[0])
