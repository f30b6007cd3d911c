"""The method registry: every registered method against a slow reference at the layer level,
and a method defined in one place (here, a toy) accepted by the layer, SALlamaConfig and the
budget without touching any other file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from stochastic_attention import vocabulary
from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM
from stochastic_attention.nn import KVCache, MultiHeadAttention, mean_attended_keys, methods
from stochastic_attention.nn.methods import Method, MethodOptions, register, unregister
from stochastic_attention.nn.methods.base import check_number
from stochastic_attention.nn.options import OPTIONS, owners_of
from stochastic_attention.ops.bigbird import bigbird_mask
from stochastic_attention.ops.dense import masked_attention, repeat_kv
from stochastic_attention.ops.fractional import fractional_weights
from stochastic_attention.ops.moba import moba_reference
from stochastic_attention.ops.patterns import dense_mask

HIDDEN, HEADS, KV_HEADS, N = 24, 4, 2, 19  # head_dim 6, GQA groups of 2, an odd length
TOL = dict(rtol=1e-5, atol=1e-5)  # the unions merge their parts in fp32, even for fp64 inputs


# ---- the toy method: everything a method needs, in one definition ----------------------------


@dataclass(frozen=True, kw_only=True)
class LastTokenOptions(MethodOptions):
    """Each query attends to itself only; ``gain`` scales the values."""

    method = "last_token"
    gain: float = 1.0

    def __post_init__(self) -> None:
        check_number("gain", self.gain, "the values' scale")


class LastToken(Method):
    options_class = LastTokenOptions

    def attend(self, layer, x, q, k, v, key_mask, perm):
        out = layer.options.gain * repeat_kv(v, q.shape[1] // v.shape[1])
        # A padded query sees no key (itself is padding): zeros, as every operator gives.
        return out if key_mask is None else out * key_mask[:, None, :, None]

    def mean_keys(self, options, n):
        return 1.0


@pytest.fixture
def last_token():
    register(LastToken)
    try:
        yield
    finally:
        unregister("last_token")


# ---- helpers ---------------------------------------------------------------------------------


def make(method: str, **options) -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(HIDDEN, HEADS, num_kv_heads=KV_HEADS, method=method,
                              options=options, qk_norm=True).double()


def projected(layer, x):
    """q, k, v of the layer after projections, QK-norm and RoPE (positions 0..n-1)."""
    B, n, _ = x.shape
    q = layer.q_proj(x).view(B, n, layer.num_heads, layer.head_dim).transpose(1, 2)
    k = layer.k_proj(x).view(B, n, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    v = layer.v_proj(x).view(B, n, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    q, k = layer.q_norm(q), layer.k_norm(k)
    return (*layer.rotary(q, k, torch.arange(n)[None]), v)


def dense(layer, q, k, v, mask):
    groups = layer.num_heads // layer.num_kv_heads
    return masked_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), mask,
                            layer.head_dim**-0.5)


def padding(batch: int = 2, n: int = N) -> torch.Tensor:
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, :3] = False  # left padding in one row
    return mask


# ---- every registered method against a reference written independently of the layer ---------


def _windowed(layer, x, q, k, v, key_mask, perm, window, local=0):
    o = layer.options
    return dense(layer, q, k, v, dense_mask(x.shape[1], window, perm=perm, key_mask=key_mask,
                                            sinks=getattr(o, "sinks", 0),
                                            layout=getattr(o, "layout", "band"),
                                            local=local))


def _gated(layer, x, q, k, v, key_mask, perm):
    o = layer.options
    stochastic = _windowed(layer, x, q, k, v, key_mask, perm, o.window)
    sliding = _windowed(layer, x, q, k, v, key_mask, None, o.sliding_window)
    return layer.gate(x, stochastic, sliding)


def _fractional(layer, x, q, k, v, key_mask, perm):
    o = layer.options
    weights = fractional_weights(q, k, o.alpha, eps=o.eps, causal=True, key_mask=key_mask,
                                 window=o.window, layout=o.layout,
                                 perm=perm if o.windows == "stochastic" else None)
    groups = layer.num_heads // layer.num_kv_heads
    return weights @ repeat_kv(v.masked_fill(~key_mask[:, None, :, None], 0), groups)


def _bigbird(layer, x, q, k, v, key_mask, perm):
    o = layer.options
    indices = layer.draw_random_keys(x.shape[0], x.shape[1], key_mask=key_mask)  # eval: seeded
    return dense(layer, q, k, v, bigbird_mask(x.shape[1], o.window, indices, sinks=o.sinks,
                                              key_mask=key_mask))


# method -> (options, reference(layer, x, q, k, v, key_mask, perm) -> [B, H, n, D])
REFERENCES = {
    "full": ({}, lambda layer, x, *a: _windowed(layer, x, *a, window=x.shape[1])),
    "sliding_window": (dict(window=5, sinks=2),
                       lambda layer, x, q, k, v, m, p: _windowed(layer, x, q, k, v, m, None,
                                                                 layer.options.window)),
    "stochastic": (dict(window=4, sinks=1, layout="block"),
                   lambda layer, *a: _windowed(layer, *a, window=layer.options.window)),
    "stochastic_local": (dict(window=3, local=2, sinks=1),
                         lambda layer, *a: _windowed(layer, *a, window=layer.options.window,
                                                     local=layer.options.local)),
    "gated": (dict(window=5, local_window=3, sinks=1, gate_granularity="channel"), _gated),
    "moba": (dict(block_size=4, top_k=2, sinks=1),
             lambda layer, x, q, k, v, m, p: moba_reference(
                 q, k, v, layer.options.block_size, layer.options.top_k,
                 sinks=layer.options.sinks, key_mask=m)),
    "fractional": (dict(window=5, windows="stochastic", alpha=1.2), _fractional),
    "bigbird": (dict(window=3, random_keys=3, sinks=1), _bigbird),
}


def test_registry_is_the_vocabulary_and_one_module_per_method():
    assert methods.method_names() == vocabulary.METHODS == tuple(OPTIONS)
    folder = Path(methods.__file__).parent
    for name in methods.method_names():
        impl = methods.method_named(name)
        assert impl.name == name and impl.options_class is OPTIONS[name]
        assert (folder / f"{name}.py").is_file()
        assert type(impl).__module__ == f"{methods.__name__}.{name}"
    # every registered method has a reference below
    assert set(REFERENCES) == set(methods.method_names())


@pytest.mark.parametrize("method", vocabulary.METHODS)
def test_every_method_matches_its_reference_outputs_and_gradients(method):
    options, reference = REFERENCES[method]
    layer = make(method, **options).eval()  # eval: seeded draws, so the reference redraws them
    x = torch.randn(2, N, HIDDEN, dtype=torch.double, requires_grad=True)
    key_mask = padding()
    perm = layer.draw_permutation(2, N, key_mask=key_mask) if layer.uses_permutation else None
    out = layer(x, attention_mask=key_mask, perm=perm)
    mixed = reference(layer, x, *projected(layer, x), key_mask, perm)
    ref = layer.o_proj(mixed.transpose(1, 2).reshape(2, N, -1))
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    params = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g),
                    torch.autograd.grad(ref, params, g, allow_unused=True), strict=True):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, **TOL)


# ---- a method registered here works everywhere ------------------------------------------------


def test_a_registered_method_works_in_the_layer(last_token):
    layer = make("last_token", gain=2.0)
    assert isinstance(layer.options, LastTokenOptions) and layer.options.gain == 2.0
    x = torch.randn(2, N, HIDDEN, dtype=torch.double)
    key_mask = padding()
    out = layer(x, attention_mask=key_mask)
    _, _, v = projected(layer, x)
    values = 2.0 * repeat_kv(v, HEADS // KV_HEADS) * key_mask[:, None, :, None]
    torch.testing.assert_close(out, layer.o_proj(values.transpose(1, 2).reshape(2, N, -1)))
    # cached decoding (the default: the operator's rows over the cache) equals the forward pass
    cache = KVCache()
    steps = [layer(x[:, :5], cache=cache, attention_mask=key_mask[:, :5])]
    steps += [layer(x[:, i:i + 1], cache=cache, attention_mask=key_mask[:, :i + 1])
              for i in range(5, N)]
    torch.testing.assert_close(torch.cat(steps, dim=1), out)
    # packed documents: each as alone
    ids = torch.tensor([[0] * 7 + [1] * 12])
    packed = layer(x[:1], document_ids=ids)
    alone = torch.cat([layer(x[:1, :7]), layer(x[:1, 7:])], dim=1)
    torch.testing.assert_close(packed, alone)
    with pytest.raises(ValueError, match="gain must be > 0"):
        make("last_token", gain=0)
    with pytest.raises(ValueError, match="unknown options"):
        make("last_token", window=3)


def test_a_registered_method_works_in_sa_llama_and_the_budget(last_token, tmp_path):
    config = SALlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           attention_methods=["last_token", "stochastic"],
                           attention_options={"gain": 0.5, "window": 4})
    assert config.layer_options(0) == LastTokenOptions(gain=0.5)
    model = SALlamaForCausalLM(config).eval()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).attention_options == {"gain": 0.5, "window": 4}
    assert owners_of("gain") == ("last_token",)
    with pytest.raises(ValueError, match="'gain' is an option of 'last_token' layers only"):
        SALlamaConfig(num_hidden_layers=1, attention_methods="full",
                      attention_options={"gain": 0.5})
    assert mean_attended_keys(config, "last_token", 10) == 1.0
    assert mean_attended_keys({"gain": 3.0}, "last_token", 1) == 1.0


def test_an_unregistered_method_is_gone_and_registration_checks_names(last_token):
    with pytest.raises(ValueError, match="already registered"):
        register(LastToken)

    @dataclass(frozen=True, kw_only=True)
    class Old(MethodOptions):
        method = "swa"

    class OldName(Method):
        options_class = Old

    with pytest.raises(ValueError, match="former name of 'sliding_window'"):
        register(OldName)
    with pytest.raises(TypeError, match="Method subclass"):
        register(LastTokenOptions)
    unregister("last_token")
    try:
        with pytest.raises(ValueError, match="method must be one of"):
            make("last_token")
        with pytest.raises(ValueError, match="attention_methods entry must be one of"):
            SALlamaConfig(num_hidden_layers=1, attention_methods="last_token")
        assert methods.method_names() == vocabulary.METHODS
    finally:
        register(LastToken)  # the fixture unregisters it
