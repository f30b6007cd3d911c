"""full: causal attention over every earlier token."""

from __future__ import annotations

from dataclasses import dataclass

from ...functional import sliding_window_attention
from .base import Method, MethodOptions, full_cache
from .registry import register


@dataclass(frozen=True, kw_only=True)
class FullOptions(MethodOptions):
    """Full causal attention: nothing to choose."""

    method = "full"


@register
class Full(Method):
    options_class = FullOptions

    def attend(self, layer, x, q, k, v, key_mask, perm):
        return sliding_window_attention(q, k, v, max(q.shape[2], 1), key_mask=key_mask,
                                        backend=layer.backend)

    def attend_cached(self, layer, x, q, k, v, key_mask):
        return full_cache(q, k, v, key_mask)

    def mean_keys(self, options, n):
        return (n + 1) / 2
