"""One softmax over the union of DISJOINT key sets ("parts"), through PyTorch's CPU flash kernel.

An operator that attends to several key sets at once (the SA + local union, BigBird's window and
random keys) computes each set as its own small attention and merges them exactly through their
log-sum-exps. Done explicitly (:func:`.blocked.attend_with_lse`), every part costs an fp32
score matrix, an exp and their saved copies for autograd. Here each part is one call of the
fused CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the
output and the log-sum-exp, and the backward uses the split-KV identity of ring attention: for
the merged output ``O`` with global log-sum-exp ``lse`` and gradient ``dO``, a part's share of
the exact gradient is ``P = exp(S_part - lse)``, ``dS = P * (dO V^T - rowsum(dO * O))``, which is
exactly what the kernel's own backward computes when it is given ``O``, ``lse`` and ``dO`` of
the MERGED result instead of the part's. Nothing of size ``T x S`` is saved.

Each part's queries live in their own layout (query tiles in permuted order, a key set per
query, ...). A part therefore carries two layout maps: ``to_common`` sends a part-layout tensor
[N, M, T, C] to the merged layout (e.g. [B, H, n, C]), ``from_common`` sends it back, filling the
part rows that no merged row maps to (tile padding) with a given value. Rows with no visible key
in any part give 0 and zero gradients (no NaN): they are found from the masks and handled by
selection. Off the CPU, :func:`attend_parts` runs :func:`attend_parts_reference`, the explicit
path, which is also what the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import blocked

__all__ = ["Part", "attend_parts", "attend_parts_reference", "identity_layout", "tile_layout",
           "window_part"]

NEG_INF = float("-inf")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _same_fill(x: torch.Tensor, fill: float) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Part:
    """One key set of a merged attention.

    q [N, M, T, D]; k, v [N, M, S, D] (same N, M: expand GQA heads first); mask broadcastable to
    [N, M, T, S], additive (0 / -inf) or bool (True = visible), or None for all visible.
    ``to_common(x)`` maps [N, M, T, C] to the merged layout [..., n, C]; ``from_common(x, fill)``
    maps back, with ``fill`` in the part rows no merged row maps to. Identity by default.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None
    to_common: Callable[[torch.Tensor], torch.Tensor] = _same
    from_common: Callable[[torch.Tensor, float], torch.Tensor] = _same_fill


def identity_layout() -> tuple[Callable, Callable]:
    return _same, _same_fill


def tile_layout(plan: blocked.TilePlan, B: int, H: int,
                outer: tuple[Callable, Callable] | None = None) -> tuple[Callable, Callable]:
    """Layout maps of query tiles [B * H, nt, T, C] <-> [B, H, n, C] (then ``outer``'s maps)."""
    to_outer, from_outer = outer if outer is not None else identity_layout()

    def to_common(x: torch.Tensor) -> torch.Tensor:
        return to_outer(plan.unpad(x.view(B, H, plan.nt, plan.T, x.shape[-1])))

    def from_common(x: torch.Tensor, fill: float) -> torch.Tensor:
        x = from_outer(x, fill)
        x = F.pad(x, (0, 0, 0, plan.pad), value=fill)
        return x.reshape(B * H, plan.nt, plan.T, x.shape[-1])

    return to_common, from_common


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The kernel takes an additive mask of the query's dtype."""
    if mask is None or mask.dtype == dtype:
        return mask
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)
    return mask.to(dtype)


def _has_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """[.., T, 1] bool: the rows that see at least one key (None: every row does)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.any(dim=-1, keepdim=True)
    return (mask > NEG_INF).any(dim=-1, keepdim=True)


def _merge(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """Log-sum-exp merge of normalised part outputs [.., n, D] with lses [.., n, 1] (-inf = no key).

    Returns the merged output (0 on rows with no key anywhere) and lse (-inf there).
    """
    m = lses[0]
    for lse in lses[1:]:
        m = torch.maximum(m, lse)
    m = torch.where(m > NEG_INF, m, torch.zeros_like(m))  # any finite shift is exact
    out = total = None
    for o, lse in zip(outs, lses):
        w = torch.exp(lse - m)  # 0 where the part has no key
        term = torch.where(w > 0, o * w, torch.zeros((), dtype=o.dtype, device=o.device))
        out = term if out is None else out + term
        total = w if total is None else total + w
    lse = m + torch.log(total)  # -inf exactly where total == 0
    out = out / torch.where(total > 0, total, torch.ones_like(total))
    return out, lse


class _FlashParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, maps, masks, *qkv):
        outs, lses = [], []
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        for i, (to_common, _) in enumerate(maps):
            q, k, v = qkv[3 * i: 3 * i + 3]
            out, lse = kernel(q, k, v, 0.0, False, attn_mask=masks[i], scale=scale)
            lse = lse.unsqueeze(-1)
            has_key = _has_key(masks[i])
            if has_key is not None:  # the kernel's lse of an empty row is finite: select
                lse = torch.where(has_key, lse, NEG_INF)
                out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype))
            outs.append(to_common(out.to(lse.dtype)))
            lses.append(to_common(lse))
        out, lse = _merge(outs, lses)
        out = out.to(qkv[0].dtype)
        # The backward reads P = exp(S - lse): +inf on empty rows makes every P there 0.
        lse_b = torch.where(lse > NEG_INF, lse, float("inf"))
        ctx.scale, ctx.maps, ctx.masks = scale, maps, masks
        ctx.save_for_backward(out, lse_b, *qkv)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        out, lse_b, *qkv = ctx.saved_tensors
        grad_out = grad_out.to(out.dtype)
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grads = []
        for i, (_, from_common) in enumerate(ctx.maps):
            q, k, v = qkv[3 * i: 3 * i + 3]
            g = from_common(grad_out, 0.0).contiguous()
            o = from_common(out, 0.0).contiguous()
            lse = from_common(lse_b, float("inf")).squeeze(-1).contiguous()
            grads += kernel(g, q, k, v, o, lse, 0.0, False, attn_mask=ctx.masks[i],
                            scale=ctx.scale)
        return (None, None, None, *grads)


def attend_parts(parts: Sequence[Part], scale: float) -> torch.Tensor:
    """Attention of every merged row to the union of its parts' keys, in one softmax.

    The parts' key sets must be disjoint (a key in two parts would count twice). Returns the
    merged output [..., n, D] in q's dtype; a row with no visible key in any part gives 0.
    Exact up to float rounding in both passes, for any float dtype (float64 included).
    """
    if not parts:
        raise ValueError("attend_parts needs at least one part")
    if not all(p.q.device.type == "cpu" for p in parts):
        return attend_parts_reference(parts, scale)
    dtype = parts[0].q.dtype
    maps = tuple((p.to_common, p.from_common) for p in parts)
    masks = tuple(_additive(p.mask, dtype) for p in parts)
    qkv = [x for p in parts for x in (p.q, p.k, p.v)]
    return _FlashParts.apply(float(scale), maps, masks, *qkv)


def attend_parts_reference(parts: Sequence[Part], scale: float) -> torch.Tensor:
    """The same result through explicit fp32 (fp64 for fp64 inputs) softmaxes and autograd."""
    outs, lses = [], []
    for p in parts:
        mask = p.mask
        if mask is None:
            mask = torch.zeros((), device=p.q.device)
        elif mask.dtype == torch.bool:
            mask = torch.zeros((), device=p.q.device).masked_fill(~mask, NEG_INF)
        if p.q.dtype == torch.float64:
            out, lse = _explicit64(p.q, p.k, p.v, mask.double(), scale)
        else:
            out, lse = blocked.attend_with_lse(p.q, p.k, p.v, mask.float(), scale)
        outs.append(p.to_common(out))
        lses.append(p.to_common(lse.unsqueeze(-1)))
    out, _ = _merge(outs, lses)
    return out.to(parts[0].q.dtype)


def _explicit64(q, k, v, bias, scale):
    """attend_with_lse in float64 (it computes in fp32), for exact fp64 references."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    has_key = (bias > NEG_INF).any(dim=-1, keepdim=True)
    safe = torch.where(has_key, scores, torch.zeros((), dtype=scores.dtype))
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    out = torch.matmul(torch.softmax(safe, dim=-1), v)
    out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype))
    return out, torch.where(has_key, lse, NEG_INF).squeeze(-1)


def window_part(tiles: tuple, outer: tuple[Callable, Callable] | None = None) -> Part:
    """A :class:`Part` from ``blocked.windowed_attention(..., return_tiles=True)``.

    q tiles [B, H, nt, T, D], k/v tiles [B, H, nt, L, D], bias [B|1, H|1, nt, T, L] become the
    kernel's 4-D [B * H, nt, ., .]; ``outer`` maps [B, H, n, C] on to the merged layout (e.g. the
    inverse permutation) and back.
    """
    plan, qt, kt, vt, bias = tiles
    B, H, nt, T, D = qt.shape
    q4, k4, v4 = (x.reshape(B * H, nt, x.shape[-2], D) for x in (qt, kt, vt))
    if bias.shape[0] == 1 and bias.shape[1] == 1:
        bias4 = bias.reshape(1, *bias.shape[2:])
    else:
        bias4 = bias.expand(B, H, *bias.shape[2:]).reshape(B * H, *bias.shape[2:])
    to_common, from_common = tile_layout(plan, B, H, outer)
    return Part(q4, k4, v4, bias4, to_common, from_common)
