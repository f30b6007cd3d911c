"""Test helpers for anyone adding a backend or a method: random inputs and one comparison.

``assert_matches_reference`` is the check every fast path in this package passes: the same
outputs AND the same gradients as a slow, obviously correct reference, under a loss that gives
every output element its own gradient (a plain ``.sum()`` would let errors that cancel across a
row through).

``tiny_hf_model`` builds a small random Hugging Face model of each supported family, for tests of
the patch and of anything that runs on a patched model.

``compile_counted`` compiles a function whole (``fullgraph=True``) with a counter of the graphs it
compiles, and ``graph_breaks`` reads dynamo's break counters: together they show that a path
compiles without breaks and without recompiling on new permutations or lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["HF_FAMILIES", "assert_matches_reference", "compile_counted", "graph_breaks", "outputs_and_grads",
           "projected_qkv", "random_key_mask", "random_qkv", "take_grads", "tiny_hf_model"]


def random_qkv(n: int, *, batch: int = 2, heads: int = 4, kv_heads: int = 2, dim: int = 16,
               dtype: torch.dtype = torch.float32, seed: int = 0, grad: bool = True,
               device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """q [batch, heads, n, dim] and k, v [batch, kv_heads, n, dim], standard normal, seeded."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim))
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
            for s in shapes]


def random_key_mask(batch: int, n: int, *, seed: int = 0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool [batch, n] key mask (True = real) with left padding, right padding and holes."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, : n // 3] = False  # left padding
    mask[-1, n - n // 4:] = False  # right padding
    mask &= torch.rand(batch, n, generator=g) > 0.1  # holes
    return mask.to(device)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision up to float32; float32 and float64 as they are (float64 keeps its digits)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in float32, or in float64 where either is float64."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def outputs_and_grads(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                      **kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """fn(*inputs, **kwargs) and the gradients of a non-linear loss of it w.r.t. ``inputs``.

    The loss ``sum(out * cos(out))`` weights every output element differently, so a wrong
    gradient cannot hide behind a symmetric one.
    """
    out = fn(*inputs, **kwargs)
    wanted = [t for t in inputs if t.requires_grad]
    if not wanted:
        return out, tuple(None for _ in inputs)
    out_ = _at_least_float32(out)
    loss = (out_ * torch.cos(out_)).sum()
    got = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return out, tuple(next(got) if t.requires_grad else None for t in inputs)


def assert_matches_reference(fn: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                             inputs: Sequence[torch.Tensor], *, atol: float = 1e-5,
                             grad_atol: float = 1e-4, rtol: float = 0.0, grad_rtol: float | None = None,
                             **kwargs) -> torch.Tensor:
    """Assert ``fn`` equals ``reference`` on ``inputs`` (outputs and gradients); return fn's output.

    ``kwargs`` go to both. Gradients are compared for every input that requires grad; an input
    that one side leaves without gradient counts as a zero gradient. ``grad_rtol`` defaults to
    ``rtol``. Both sides are compared in float32, or float64 where either is float64.
    """
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    out, grads = outputs_and_grads(fn, inputs, **kwargs)
    ref, ref_grads = outputs_and_grads(reference, inputs, **kwargs)
    torch.testing.assert_close(*_common_dtype(out, ref), atol=atol, rtol=rtol, msg=lambda m: f"output: {m}")
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(inputs[i]) if a is None else a
        b = torch.zeros_like(inputs[i]) if b is None else b
        torch.testing.assert_close(*_common_dtype(a, b), atol=grad_atol, rtol=grad_rtol,
                                   msg=lambda m, i=i: f"gradient of input {i}: {m}")
    return out


def projected_qkv(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a ``MultiHeadAttention`` after its projections and RoPE at positions 0..n-1.

    What a slow reference of a layer starts from: q [batch, heads, n, head_dim] and k, v
    [batch, kv_heads, n, head_dim] (no query/key norm, no cache).
    """
    B, n, _ = x.shape
    q = layer.q_proj(x).view(B, n, layer.num_heads, layer.head_dim).transpose(1, 2)
    k = layer.k_proj(x).view(B, n, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    v = layer.v_proj(x).view(B, n, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    q, k = layer.rotary(q, k, torch.arange(n, device=x.device)[None])
    return q, k, v


# Each family's config and model class in transformers, and the options its tiny model needs.
_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16}),
}
HF_FAMILIES: tuple[str, ...] = tuple(_HF_CLASSES)
_TINY_HF = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random Hugging Face causal LM of ``family`` (one of ``HF_FAMILIES``), in eval mode.

    2 layers, hidden size 64, 4 query and 2 key/value heads, vocabulary 97, SDPA attention, weights
    drawn after ``torch.manual_seed(seed)``; ``overrides`` go to the config. Needs transformers.
    """
    if family not in _HF_CLASSES:
        raise ValueError(f"family must be one of {HF_FAMILIES}, got {family!r}")
    import transformers  # only here: the rest of this module works without it

    config_name, model_name, extra = _HF_CLASSES[family]
    config = getattr(transformers, config_name)(**{**_TINY_HF, **extra, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def compile_counted(fn: Callable, backend: str = "aot_eager", **options):
    """``torch.compile(fn, fullgraph=True)`` (any graph break raises) with ``backend``, and the
    counter whose ``frame_count`` is the number of graphs compiled so far.

    ``aot_eager`` traces forward and backward as inductor would, without generating code: the
    cheap way to count breaks and recompiles; pass ``backend="inductor"`` to check the code.
    """
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, **options), counter


def graph_breaks() -> int:
    """Graph breaks dynamo has counted since ``torch._dynamo.utils.counters.clear()``."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def take_grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The ``.grad`` of each tensor (a copy), which is then cleared for the next backward."""
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out
