"""moba: each query attends to its own block and the best-scoring earlier blocks (MoBA).

Cached decoding runs the operator for the new rows (the default of :class:`~.base.Method`),
so it computes what a forward pass over the whole sequence computes at those positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...ops import moba
from .base import Method, MethodOptions, check_int, check_sinks
from .registry import register


@dataclass(frozen=True, kw_only=True)
class MobaOptions(MethodOptions):
    """MoBA: each query attends to its own block and the ``top_k - 1`` earlier blocks of
    ``block_size`` keys whose mean key scores highest, plus the first ``sinks`` tokens."""

    method = "moba"
    block_size: int = 64
    top_k: int = 2
    sinks: int = 0

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("top_k", self.top_k, 1, " (blocks per query, its own included)")
        check_sinks(self.sinks)


@register
class Moba(Method):
    options_class = MobaOptions

    def attend(self, layer, x, q, k, v, key_mask, perm):
        o = layer.options
        return moba.moba_attention(q, k, v, o.block_size, o.top_k, sinks=o.sinks,
                                   key_mask=key_mask)

    def mean_keys(self, options, n):
        """``moba_attended_keys`` plus the sinks outside the blocks a query surely sees (an
        upper bound: a chosen earlier block may hold them)."""
        block = options.block_size
        counts = moba.moba_attended_keys(n, block, options.top_k).float()
        own = torch.div(torch.arange(n), block, rounding_mode="floor")
        # Sinks before the own block, unless every earlier block is chosen anyway.
        extra = torch.clamp(torch.minimum(own * block, torch.tensor(options.sinks)), min=0)
        counts = counts + torch.where(own >= options.top_k, extra, 0)
        return float(counts.mean())
