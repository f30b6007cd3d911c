"""The CPU flash path as ``torch.library`` custom operators, so that compiled graphs keep it.

:mod:`.flashband` runs eager Python (a loop over chunks, buffers, an ``autograd.Function``) that
``torch.compile`` would otherwise have to trace. Registered as two opaque operators (forward
and backward) with shape-only fake implementations and an autograd formula, it enters a graph
as one node: no graph break, no recompile for a new permutation or length, and the same kernel
calls as eager code. The windows are passed as plain arguments and turned into parts inside
(:func:`.flashband.window_parts`: a list of dataclasses is not a type an operator schema can
carry): SWA (``perm`` None), SA in a layout, and the SA + local union (``local`` > 0).
"""

from __future__ import annotations

import torch

from . import flashband

__all__ = ["attention"]


@torch.library.custom_op("stochastic_attention::flashband_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor | None,
             window: int, layout: str, causal: bool, local: int, scale: float,
             sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, the backward's log-sum-exp: +inf on rows with no key)."""
    parts = flashband.window_parts(perm, window, layout, causal, local)
    out, lse = flashband._forward(q, k, v, parts, scale, True, sinks)
    return out.to(q.dtype), torch.where(lse > flashband.NEG_INF, lse, float("inf"))


@_forward.register_fake
def _(q, k, v, perm, window, layout, causal, local, scale, sinks):
    B, H, n, _ = q.shape
    work = flashband._work_dtype(q.dtype)
    return torch.empty_like(q), q.new_empty((B, H, n, 1), dtype=work)


@torch.library.custom_op("stochastic_attention::flashband_backward", mutates_args=())
def _backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, perm: torch.Tensor | None, window: int,
              layout: str, causal: bool, local: int, scale: float,
              sinks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = flashband.window_parts(perm, window, layout, causal, local)
    dq, dk, dv = flashband._backward(flashband.addressable(grad.to(q.dtype)), q, k, v, out, lse,
                                     parts, scale, sinks)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_backward.register_fake
def _(grad, q, k, v, out, lse, perm, window, layout, causal, local, scale, sinks):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, perm, window, layout, causal, local, scale, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, perm)
    ctx.options = (window, layout, causal, local, scale, sinks)


def _backward_formula(ctx, grad_out, grad_lse):
    q, k, v, out, lse, perm = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, q, k, v, out, lse, perm, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None


_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor | None,
              window: int, layout: str, causal: bool, local: int, scale: float,
              sinks: int = 0) -> torch.Tensor:
    """:func:`.flashband.attention` of :func:`.flashband.window_parts`, as one operator (finite
    keys; ``perm`` sorted by group for the block layout)."""
    q, k, v = (flashband.addressable(x) for x in (q, k, v))
    return _forward(q, k, v, perm, window, layout, causal, local, float(scale), int(sinks))[0]
