"""Attention under an arbitrary boolean mask, computed in query chunks.

MoBA's dense cross-check (:func:`.moba.moba_masked`) is served here:
the mask of a chunk of query rows is built by the caller, then one SDPA call per chunk. Time is
O(n^2) but memory is O(chunk * n), so a few thousand tokens fit comfortably.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .reference import masked_attention

# Query rows per SDPA call: bounds the [B, H, rows, n] score matrix.
ROW_CHUNK = 512


def chunked_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_rows: Callable[[int, int], torch.Tensor],
    scale: float,
    chunk: int = ROW_CHUNK,
) -> torch.Tensor:
    """softmax(q k^T * scale) v where ``mask_rows(start, stop)`` gives the visible keys.

    q [B, Hq, L, D]; k, v [B, Hkv, S, D] (grouped-query heads are expanded here);
    ``mask_rows`` returns bool broadcastable to [B, Hq, stop - start, S]. A query with no visible
    key returns zeros (same rule as the core operators).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    finite = bool(torch.isfinite(k).all())
    outs = []
    for start in range(0, q.shape[2], chunk):
        stop = min(start + chunk, q.shape[2])
        mask = mask_rows(start, stop)
        if not finite:  # SDPA adds its mask, so a NaN key would reach hidden queries: select
            outs.append(masked_attention(q[:, :, start:stop], k, v, mask, scale))
            continue
        has_key = mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask | ~has_key,
                                             scale=scale)
        outs.append(out * has_key)
    return torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)
