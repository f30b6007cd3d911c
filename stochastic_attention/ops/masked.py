"""Attention under an arbitrary boolean mask, computed in query chunks, and the SA + local union.

Patterns the windowed backends cannot express (the union of an SA window with a local window,
MoBA's data-dependent blocks) are served here: the mask of a chunk of query rows is built from
the shared rule in :mod:`.patterns`, then one SDPA call per chunk. Time is O(n^2) but memory is
O(chunk * n), so a few thousand tokens fit comfortably.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .patterns import inverse_permutation, visible

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
    outs = []
    for start in range(0, q.shape[2], chunk):
        stop = min(start + chunk, q.shape[2])
        mask = mask_rows(start, stop)
        has_key = mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask | ~has_key,
                                             scale=scale)
        outs.append(out * has_key)
    return torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)


def union_mask_rows(
    rows: torch.Tensor,
    seq_len: int,
    window: int,
    local: int,
    *,
    perm: torch.Tensor,
    layout: str,
    sinks: int,
    key_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Causal visibility of every key to the query positions ``rows``: SA window OR local window.

    The SA part is :func:`.patterns.visible` under ``perm`` [B|1, H|1, n]; the local part is the
    same rule with the identity permutation (slot == position) and window ``local``, i.e. the
    last ``local`` positions up to the query. Returns bool [B|1, H|1, len(rows), n].
    """
    pos_k = torch.arange(seq_len, device=rows.device)
    slot_of = inverse_permutation(perm)
    key_valid = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    sa = visible(slot_of[..., rows, None], slot_of[..., None, :], rows[:, None], pos_k[None, :],
                 window=window, layout=layout, causal=True, sinks=sinks, seq_len=seq_len,
                 key_valid=key_valid)
    if local <= 0:
        return sa
    near = visible(rows[:, None], pos_k[None, :], rows[:, None], pos_k[None, :], window=local,
                   layout="band", causal=True, sinks=0, seq_len=seq_len, key_valid=key_valid)
    return sa | near


def stochastic_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    local: int,
    *,
    perm: torch.Tensor,
    layout: str = "band",
    sinks: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal SA whose every query also sees its last ``local`` tokens, in one softmax.

    A key in both the SA window and the local window counts once. ``perm`` as in
    :func:`stochastic_attention.stochastic_attention` ([B|1, H|1, n]); with ``local=0`` this is
    exactly causal SA.
    """
    n = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    perm = perm.view((1,) * (3 - perm.dim()) + tuple(perm.shape))

    def mask_rows(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=q.device)
        return union_mask_rows(rows, n, window, local, perm=perm, layout=layout, sinks=sinks,
                               key_padding_mask=key_padding_mask)

    return chunked_masked_attention(q, k, v, mask_rows, scale)
