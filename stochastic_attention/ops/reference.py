"""The reference backend: a dense n x n mask and an explicit softmax. O(n^2), obviously correct.

It is the ground truth every other backend is tested against; use it for small problems only.
"""

from __future__ import annotations

import torch

from .patterns import dense_mask


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v over visible keys; rows with no visible key give zeros.

    q [..., Lq, D], k/v [..., Lk, D], mask bool broadcastable to [..., Lq, Lk]. Computed in fp32
    (fp64 for fp64 inputs, so gradcheck holds). Hidden keys are selected away, never added to
    -inf: a NaN key reaches only the queries that see it.
    """
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf; shift it by 0 so exp gives 0 instead of NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, v.to(dt)).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    perm: torch.Tensor | None,
    layout: str,
    causal: bool,
    sinks: int,
    key_mask: torch.Tensor | None,
    scale: float,
    local: int = 0,
) -> torch.Tensor:
    """Windowed attention in original order; ``perm`` [B|1, H|1, n] or None (SWA)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    mask = dense_mask(
        q.shape[2], window, perm=perm, layout=layout, causal=causal, sinks=sinks,
        key_mask=key_mask, device=q.device, local=local,
    )
    return masked_attention(q, k, v, mask, scale)
