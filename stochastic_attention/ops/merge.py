"""One softmax over the union of DISJOINT key sets ("parts"), through PyTorch's CPU flash kernel.

An operator that attends to several key sets at once (the SA + local union, BigBird's window and
random keys) computes each set as its own small attention and merges them exactly through their
log-sum-exps (:func:`.dense.merge_attention`). Done explicitly (:func:`.blocked.attend_with_lse`),
every part costs an fp32 score matrix, an exp and their saved copies for autograd. Here each
part is one call of the fused CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu``,
which returns the output and the log-sum-exp, and the backward uses the split-KV identity of ring attention: for
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

The kernel's cost is per query row, nearly whatever the number of keys, so parts of a few keys
per query are computed with elementwise products instead, with the same merged-output backward:
:class:`BandPart` (key ``i - o`` at offset ``o``) and :class:`RowsPart` (each row its own keys).
:mod:`.parts` builds the parts of the operators from their tiles, windows and sinks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .blocked import attend_with_lse
from .dense import compute_dtype, merge_attention

__all__ = ["BAND_PART_MAX_WIDTH", "BandPart", "Part", "RowsPart", "attend_parts",
           "attend_parts_reference", "identity_layout"]

NEG_INF = float("-inf")
# Widest band computed as a BandPart rather than kernel tiles: the crossover of the two for
# training (forward + backward) on one CPU thread, head_dim 32, 256 tokens (4: 36 vs 63 ms,
# 8: 47 vs 64, 16: 73 vs 65).
BAND_PART_MAX_WIDTH = 12


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


@dataclass(frozen=True)
class BandPart:
    """A key set of a few keys per query, at fixed offsets: query i sees key ``i - o`` for
    ``o < width`` where ``mask[..., i, o]`` is True.

    q, k, v [B, H, n, D] (expand GQA heads first), in any order of the rows (e.g. permuted
    slots) that layout maps as for :class:`Part` take to the merged layout; mask bool
    broadcastable to [B, H, n, width], False wherever ``i - o < 0``. Computed offset by offset
    with elementwise products instead of the kernel: for a handful of keys per query the CPU
    flash kernel costs the same per query row whatever the key count, and this costs ~width.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    width: int
    mask: torch.Tensor
    to_common: Callable[[torch.Tensor], torch.Tensor] = _same
    from_common: Callable[[torch.Tensor, float], torch.Tensor] = _same_fill


@dataclass(frozen=True)
class RowsPart:
    """Each query row against its own few keys (gathered random keys, sinks).

    q [..., T, D]; k, v [..., T, R, D] (an ``expand``ed view is fine: no copy is made); mask
    bool broadcastable to [..., T, R]; layout maps as for :class:`Part`. Computed with
    elementwise products, which for a few keys per row are far cheaper than the kernel.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    to_common: Callable[[torch.Tensor], torch.Tensor] = _same
    from_common: Callable[[torch.Tensor, float], torch.Tensor] = _same_fill


def identity_layout() -> tuple[Callable, Callable]:
    return _same, _same_fill


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


def _shifted(x: torch.Tensor, width: int, o: int) -> torch.Tensor:
    """Rows ``i - o`` of x [.., n + width - 1, D] padded on the left by width - 1: [.., n, D]."""
    n = x.shape[-2] - width + 1
    return x[..., width - 1 - o: width - 1 - o + n, :]


def _band_scores(q, kp, width, o, mask, scale):
    s = torch.linalg.vecdot(q, _shifted(kp, width, o)).mul_(scale)
    return s.masked_fill_(~mask[..., o], NEG_INF)


def _band_forward(q, k, v, width, mask, scale):
    """out [B, H, n, D] and lse [B, H, n, 1] (-inf where no key) of a :class:`BandPart`."""
    kp, vp = (F.pad(x, (0, 0, width - 1, 0)) for x in (k, v))
    s = torch.stack([_band_scores(q, kp, width, o, mask, scale) for o in range(width)], dim=-1)
    has_key = mask.any(dim=-1, keepdim=True)
    m = torch.where(has_key, s.amax(dim=-1, keepdim=True), 0.0)
    p = torch.exp(s - m)  # 0 on masked offsets
    total = p.sum(dim=-1, keepdim=True)
    out = p[..., 0:1] * _shifted(vp, width, 0)
    for o in range(1, width):
        out = torch.addcmul(out, p[..., o: o + 1], _shifted(vp, width, o))
    out = out / torch.where(has_key, total, 1.0)
    return out, torch.where(has_key, m + torch.log(total), NEG_INF)


def _band_backward(grad_out, out, lse, q, k, v, width, mask, scale):
    """Gradients of a :class:`BandPart` given the MERGED out, lse (+inf on empty rows), grad."""
    kp, vp = (F.pad(x, (0, 0, width - 1, 0)) for x in (k, v))
    dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
    dq = torch.zeros_like(q)
    row = (grad_out * out).sum(dim=-1)  # rowsum(dO * O)
    lse = lse.squeeze(-1)
    for o in range(width):
        p = torch.exp(_band_scores(q, kp, width, o, mask, scale) - lse)  # 0 where masked
        dp = torch.linalg.vecdot(grad_out, _shifted(vp, width, o))
        ds = (p * (dp - row)).mul_(scale).unsqueeze(-1)
        dq.addcmul_(ds, _shifted(kp, width, o))
        _shifted(dkp, width, o).addcmul_(ds, q)
        _shifted(dvp, width, o).addcmul_(p.unsqueeze(-1), grad_out)
    return dq, dkp[..., width - 1:, :], dvp[..., width - 1:, :]


def _rows_scores(q, k, mask, scale):
    s = torch.linalg.vecdot(q.unsqueeze(-2), k).mul_(scale)
    return s.masked_fill_(~mask, NEG_INF)


def _rows_forward(q, k, v, mask, scale):
    """out [..., T, D] and lse [..., T, 1] (-inf where no key) of a :class:`RowsPart`."""
    s = _rows_scores(q, k, mask, scale)
    has_key = mask.any(dim=-1, keepdim=True)
    m = torch.where(has_key, s.amax(dim=-1, keepdim=True), 0.0)
    p = torch.exp(s - m)
    total = p.sum(dim=-1, keepdim=True)
    out = (p.unsqueeze(-1) * v).sum(dim=-2) / torch.where(has_key, total, 1.0)
    return out, torch.where(has_key, m + torch.log(total), NEG_INF)


def _rows_backward(grad_out, out, lse, q, k, v, mask, scale):
    """Gradients of a :class:`RowsPart` given the MERGED out, lse (+inf on empty rows), grad."""
    p = torch.exp(_rows_scores(q, k, mask, scale) - lse)  # [..., T, R], 0 where masked
    row = (grad_out * out).sum(dim=-1, keepdim=True)
    dp = torch.linalg.vecdot(grad_out.unsqueeze(-2), v)
    ds = (p * (dp - row)).mul_(scale).unsqueeze(-1)
    dq = (ds * k).sum(dim=-2)
    dk = (ds * q.unsqueeze(-2)).sum_to_size(k.shape)
    dv = (p.unsqueeze(-1) * grad_out.unsqueeze(-2)).sum_to_size(v.shape)
    return dq, dk, dv


class _FlashParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, specs, *qkv):
        outs, lses = [], []
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        work = compute_dtype(qkv[0])
        for i, spec in enumerate(specs):
            q, k, v = qkv[3 * i: 3 * i + 3]
            if spec[0] == "band":
                _, width, mask, to_common, _ = spec
                out, lse = _band_forward(*(x.to(work) for x in (q, k, v)), width, mask, scale)
                outs.append(to_common(out))
                lses.append(to_common(lse))
                continue
            if spec[0] == "rows":
                _, to_common, _, mask = spec
                out, lse = _rows_forward(*(x.to(work) for x in (q, k, v)), mask, scale)
                outs.append(to_common(out))
                lses.append(to_common(lse))
                continue
            _, to_common, _, mask = spec
            out, lse = kernel(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
            lse = lse.unsqueeze(-1)
            has_key = _has_key(mask)
            if has_key is not None:  # the kernel's lse of an empty row is finite: select
                lse = torch.where(has_key, lse, NEG_INF)
                out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype))
            outs.append(to_common(out.to(lse.dtype)))
            lses.append(to_common(lse))
        out, lse = merge_attention(outs, [x.squeeze(-1) for x in lses])
        out, lse = out.to(qkv[0].dtype), lse.unsqueeze(-1)
        # The backward reads P = exp(S - lse): +inf on empty rows makes every P there 0.
        lse_b = torch.where(lse > NEG_INF, lse, float("inf"))
        ctx.scale, ctx.specs = scale, specs
        ctx.save_for_backward(out, lse_b, *qkv)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        out, lse_b, *qkv = ctx.saved_tensors
        grad_out = grad_out.to(out.dtype)
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grads = []
        for i, spec in enumerate(ctx.specs):
            q, k, v = qkv[3 * i: 3 * i + 3]
            if spec[0] == "band":
                _, width, mask, _, from_common = spec
                work = lse_b.dtype
                band = _band_backward(from_common(grad_out.to(work), 0.0),
                                      from_common(out.to(work), 0.0),
                                      from_common(lse_b, float("inf")),
                                      *(x.to(work) for x in (q, k, v)), width, mask, ctx.scale)
                grads += [g.to(x.dtype) for g, x in zip(band, (q, k, v))]
                continue
            if spec[0] == "rows":
                _, _, from_common, mask = spec
                work = lse_b.dtype
                rows = _rows_backward(from_common(grad_out.to(work), 0.0),
                                      from_common(out.to(work), 0.0),
                                      from_common(lse_b, float("inf")),
                                      *(x.to(work) for x in (q, k, v)), mask, ctx.scale)
                grads += [g.to(x.dtype) for g, x in zip(rows, (q, k, v))]
                continue
            _, _, from_common, mask = spec
            g = from_common(grad_out, 0.0).contiguous()
            o = from_common(out, 0.0).contiguous()
            lse = from_common(lse_b, float("inf")).squeeze(-1).contiguous()
            grads += kernel(g, q, k, v, o, lse, 0.0, False, attn_mask=mask, scale=ctx.scale)
        return (None, None, *grads)


def attend_parts(parts: Sequence[Part | BandPart | RowsPart], scale: float) -> torch.Tensor:
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
    specs = tuple(("band", p.width, p.mask, p.to_common, p.from_common)
                  if isinstance(p, BandPart) else
                  ("rows", p.to_common, p.from_common, p.mask) if isinstance(p, RowsPart) else
                  ("kernel", p.to_common, p.from_common, _additive(p.mask, dtype)) for p in parts)
    qkv = [x for p in parts for x in (p.q, p.k, p.v)]
    return _FlashParts.apply(float(scale), specs, *qkv)


def _band_as_part(p: BandPart) -> Part:
    """A band part as explicit per-query key sets: q [B, H, n, 1, D], keys [B, H, n, width, D]."""
    def windows(x):  # row i, column o = x[i - o] (zero rows before the start, masked anyway)
        return F.pad(x, (0, 0, p.width - 1, 0)).unfold(-2, p.width, 1).transpose(-1, -2).flip(-2)

    return Part(p.q.unsqueeze(-2), windows(p.k), windows(p.v), p.mask.unsqueeze(-2),
                lambda x: p.to_common(x.squeeze(-2)),
                lambda x, fill: p.from_common(x, fill).unsqueeze(-2))


def _rows_as_part(p: RowsPart) -> Part:
    """A rows part as explicit one-query attentions: q [..., T, 1, D], keys [..., T, R, D]."""
    return Part(p.q.unsqueeze(-2), p.k, p.v, p.mask.unsqueeze(-2),
                lambda x: p.to_common(x.squeeze(-2)), lambda x, fill: p.from_common(x, fill).unsqueeze(-2))


def attend_parts_reference(parts: Sequence[Part | BandPart | RowsPart], scale: float) -> torch.Tensor:
    """The same result through explicit fp32 (fp64 for fp64 inputs) softmaxes and autograd."""
    outs, lses = [], []
    for p in parts:
        if isinstance(p, BandPart):
            p = _band_as_part(p)
        elif isinstance(p, RowsPart):
            p = _rows_as_part(p)
        mask = p.mask
        if mask is None:
            mask = torch.zeros((), device=p.q.device)
        elif mask.dtype == torch.bool:
            mask = torch.zeros((), device=p.q.device).masked_fill(~mask, NEG_INF)
        out, lse = attend_with_lse(p.q, p.k, p.v, mask.to(compute_dtype(p.q)), scale)
        outs.append(p.to_common(out))
        lses.append(p.to_common(lse.unsqueeze(-1)))
    out, _ = merge_attention(outs, [x.squeeze(-1) for x in lses])
    return out.to(parts[0].q.dtype)
