"""The parts of the merged operators (:mod:`.merge`): windows as kernel tiles or offsets, sinks.

The SA + local union (:func:`stochastic_attention.stochastic_attention` with ``local``) and
BigBird (:mod:`.bigbird`) build their disjoint key sets here and hand them to
:func:`.merge.attend_parts`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import blocked
from .merge import BandPart, Part, RowsPart, identity_layout

__all__ = ["permuted_band_part", "recent_band_part", "sink_rows_part", "tile_layout",
           "window_part"]


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


def recent_band_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, width: int, *,
                     skip_first: int = 0,
                     key_mask: torch.Tensor | None = None) -> BandPart:
    """Query i against positions ``(i - width, i]``, without positions ``< skip_first`` (sinks
    served elsewhere) and padded keys. q, k, v [B, H, n, D] in original order."""
    n = q.shape[-2]
    key = torch.arange(n, device=q.device).view(n, 1) - torch.arange(width, device=q.device)
    mask = (key >= max(skip_first, 0)).view(1, 1, n, width)
    if key_mask is not None:
        mask = mask & key_mask[:, key.clamp(min=0)].view(-1, 1, n, width)
    return BandPart(q, k, v, width, mask)


def sink_rows_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: int,
                   key_mask: torch.Tensor | None = None) -> RowsPart:
    """Query i against the sink positions ``0 .. sinks - 1`` it may see (causal, not padded).

    q, k, v [B, H, n, D] in original order; the sink keys are an expanded view, not a copy.
    """
    B, H, n, D = q.shape
    i = torch.arange(n, device=q.device).view(n, 1)
    seen = (torch.arange(sinks, device=q.device) <= i).view(1, 1, n, sinks)
    if key_mask is not None:
        seen = seen & key_mask[:, None, None, :sinks]
    return RowsPart(q, k[:, :, None, :sinks].expand(B, H, n, sinks, D),
                    v[:, :, None, :sinks].expand(B, H, n, sinks, D), seen)


def permuted_band_part(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, window: int, *,
                       pos: torch.Tensor, key_valid: torch.Tensor | None, exclude_recent: int,
                       sinks: int, outer: tuple[Callable, Callable]) -> BandPart:
    """The causal band layout of SA in slot space as offsets: the query at slot p sees slot
    p - o (o < window) when that key's original position is at most the query's minus
    ``exclude_recent``, is not a sink (served by :func:`sink_rows_part`) and is not padded.

    qs, ks, vs [B, H, n, D] in slot order; pos [B|1, H|1, n] original position of each slot;
    key_valid [B, 1|H, n] in slot order or None; ``outer`` maps slots to original order.
    """
    n = qs.shape[-2]
    slot = torch.arange(n, device=qs.device).view(n, 1) - torch.arange(window, device=qs.device)
    k_slot = slot.clamp(min=0)
    k_pos = pos[..., k_slot]  # [.., n, window]
    mask = (slot >= 0) & (k_pos <= pos.unsqueeze(-1) - exclude_recent) & (k_pos >= sinks)
    if key_valid is not None:
        mask = mask & key_valid[..., k_slot]
    return BandPart(qs, ks, vs, window, mask, *outer)
