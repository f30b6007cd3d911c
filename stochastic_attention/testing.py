"""Test helpers for anyone adding a backend or a method: random inputs and one comparison.

``assert_matches_reference`` is the check every fast path in this package passes: the same
outputs AND the same gradients as a slow, obviously correct reference, under a loss that gives
every output element its own gradient (a plain ``.sum()`` would let errors that cancel across a
row through).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["assert_matches_reference", "outputs_and_grads", "random_key_mask", "random_qkv"]


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
    loss = (out.float() * torch.cos(out.float())).sum()
    got = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return out, tuple(next(got) if t.requires_grad else None for t in inputs)


def assert_matches_reference(fn: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                             inputs: Sequence[torch.Tensor], *, atol: float = 1e-5,
                             grad_atol: float = 1e-4, rtol: float = 0.0, **kwargs) -> torch.Tensor:
    """Assert ``fn`` equals ``reference`` on ``inputs`` (outputs and gradients); return fn's output.

    ``kwargs`` go to both. Gradients are compared for every input that requires grad; an input
    that one side leaves without gradient counts as a zero gradient.
    """
    out, grads = outputs_and_grads(fn, inputs, **kwargs)
    ref, ref_grads = outputs_and_grads(reference, inputs, **kwargs)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"output: {m}")
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(inputs[i]) if a is None else a
        b = torch.zeros_like(inputs[i]) if b is None else b
        torch.testing.assert_close(a.float(), b.float(), atol=grad_atol, rtol=rtol,
                                   msg=lambda m, i=i: f"gradient of input {i}: {m}")
    return out
