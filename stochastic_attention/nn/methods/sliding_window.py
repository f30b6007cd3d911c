"""sliding_window: each query sees its last ``window`` real tokens and the first ``sinks``."""

from __future__ import annotations

from dataclasses import dataclass

from ...functional import sliding_window_attention
from ...ops.decode import cached_attention
from .base import Method, MethodOptions, check_sinks, check_window, window_keys
from .registry import register


@dataclass(frozen=True, kw_only=True)
class SlidingWindowOptions(MethodOptions):
    """Each query sees its last ``window`` real tokens (itself included) and the first
    ``sinks`` real tokens of its row."""

    method = "sliding_window"
    window: int = 64
    sinks: int = 0

    def __post_init__(self) -> None:
        check_window(self.window)
        check_sinks(self.sinks)


@register
class SlidingWindow(Method):
    options_class = SlidingWindowOptions

    def attend(self, layer, x, q, k, v, key_mask, perm):
        o = layer.options
        return sliding_window_attention(q, k, v, o.window, sinks=o.sinks, key_mask=key_mask,
                                        backend=layer.backend)

    def attend_cached(self, layer, x, q, k, v, key_mask):
        """The same window over the cache."""
        o = layer.options
        return cached_attention(q, k, v, o.window, o.sinks, key_mask)

    def mean_keys(self, options, n):
        return window_keys(n, options.window, options.sinks)
