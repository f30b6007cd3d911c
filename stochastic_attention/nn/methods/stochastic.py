"""stochastic: stochastic attention, windows of ``window`` keys in a random permutation's order.

Cached decoding attends to the whole cache (the paper's protocol), or with
``decode="stochastic"`` to the sinks, the last token and ``window`` random cached keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...functional import stochastic_attention
from ...ops.validate import LAYOUTS
from .base import (
    DECODES,
    Method,
    SamplingOptions,
    check_choice,
    check_sinks,
    check_window,
    full_or_sampled_decode,
    stochastic_keys,
)
from .registry import register


@dataclass(frozen=True, kw_only=True)
class StochasticOptions(SamplingOptions):
    """Stochastic attention: windows of ``window`` keys in a random permutation's order.

    layout: "band" or "block" windows in permuted order. sinks: as for sliding_window.
    decode: cached decoding attends to "full" (the whole cache, the paper's protocol) or
        "stochastic" (the sinks, the last ``max(local, 1)`` tokens and ``window`` random
        earlier tokens, gathered: O(window) per generated token).
    """

    method = "stochastic"
    window: int = 64
    layout: str = "band"
    sinks: int = 0
    decode: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window(self.window)
        check_choice("layout", self.layout, LAYOUTS)
        check_sinks(self.sinks)
        check_choice("decode", self.decode, DECODES)


@register
class Stochastic(Method):
    options_class = StochasticOptions
    permuted = True

    def attend(self, layer, x, q, k, v, key_mask, perm):
        o = layer.options
        return stochastic_attention(q, k, v, o.window, perm=perm, layout=o.layout,
                                    sinks=o.sinks, key_mask=key_mask, backend=layer.backend)

    def attend_cached(self, layer, x, q, k, v, key_mask):
        o = layer.options
        return full_or_sampled_decode(layer, q, k, v, key_mask, window=o.window, local=1)

    def mean_keys(self, options, n):
        return stochastic_keys(n, options.window, layout=options.layout, sinks=options.sinks)
