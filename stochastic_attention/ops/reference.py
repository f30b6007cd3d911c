"""The reference backend: a dense n x n mask and an explicit softmax. O(n^2), obviously correct.

It is the ground truth every other backend is tested against; use it for small problems only.
"""

from __future__ import annotations

import torch

from .dense import masked_attention, repeat_kv, zero_padding
from .patterns import dense_mask

__all__ = ["attention", "masked_attention"]


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
    local: int,
) -> torch.Tensor:
    """Windowed attention in original order; ``perm`` [B|1, H|1, n] or None (SWA).

    Every key :func:`.patterns.dense_mask` marks visible, in one explicit softmax (rows the
    window covers included: the mask encodes them); inputs validated by the caller (see
    :func:`.blocked.attention` for the arguments).
    """
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    groups = q.shape[1] // k.shape[1]
    k = repeat_kv(zero_padding(k, key_mask), groups)
    v = repeat_kv(zero_padding(v, key_mask), groups)
    mask = dense_mask(
        q.shape[2], window, perm=perm, layout=layout, causal=causal, sinks=sinks,
        key_mask=key_mask, device=q.device, local=local,
    )
    return masked_attention(q, k, v, mask, scale)
