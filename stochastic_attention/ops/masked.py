"""Attention under an arbitrary boolean mask, computed in query chunks.

MoBA's dense cross-check (:func:`.moba.moba_masked`) is served here:
the mask of a chunk of query rows is built by the caller, then one SDPA call per chunk. Time is
O(n^2) but memory is O(chunk * n), so a few thousand tokens fit comfortably.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dense import keys_finite, masked_attention, masked_sdpa, repeat_kv

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
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    # SDPA adds its mask, so a NaN key would reach hidden queries: then select instead
    attend = masked_sdpa if keys_finite(k) else masked_attention
    outs = []
    for start in range(0, q.shape[2], chunk):
        stop = min(start + chunk, q.shape[2])
        outs.append(attend(q[:, :, start:stop], k, v, mask_rows(start, stop), scale))
    return torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)
