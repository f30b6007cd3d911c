"""fractional: Fractional Neural Attention of order ``alpha``, over every earlier key or in
sliding or stochastic windows.

Cached decoding runs the operator for the new rows, so it computes what a forward pass over
the whole sequence computes at those positions; in stochastic windows it drops the windows
at decode, as stochastic attention does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ops import fractional
from ...ops.validate import LAYOUTS
from .base import (
    Method,
    SamplingOptions,
    check_choice,
    check_number,
    check_window,
    last_rows,
    stochastic_keys,
    window_keys,
)
from .registry import register

WINDOWS = ("sliding_window", "stochastic")


@dataclass(frozen=True, kw_only=True)
class FractionalOptions(SamplingOptions):
    """Fractional neural attention of order ``alpha`` (bandwidth ``eps``).

    window: None (every earlier key) or the keys per query. windows: how those windows are
        formed, "sliding_window" (each query's last ``window`` keys) or "stochastic" (windows
        of a permutation drawn as for stochastic attention, with ``layout``; decoding with a
        cache then drops the windows, as stochastic attention does).
    """

    method = "fractional"
    alpha: float = 0.5
    eps: float = 1.0
    window: int | None = None
    windows: str = "sliding_window"
    layout: str = "band"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alpha", self.alpha, "the fractional Laplacian's order, in (0, 2]")
        if self.alpha > 2:
            raise ValueError(f"alpha must be in (0, 2], got {self.alpha}")
        check_number("eps", self.eps, "the kernel bandwidth")
        if self.window is not None:
            check_window(self.window)
        check_choice("windows", self.windows, WINDOWS)
        if self.windows == "stochastic" and self.window is None:
            raise ValueError("windows='stochastic' needs window (the keys per query)")
        check_choice("layout", self.layout, LAYOUTS)


@register
class Fractional(Method):
    options_class = FractionalOptions

    def uses_permutation(self, options):
        return options.windows == "stochastic"

    def attend(self, layer, x, q, k, v, key_mask, perm):
        o = layer.options
        return fractional.fractional_attention(
            q, k, v, o.alpha, eps=o.eps, causal=True, key_mask=key_mask, window=o.window,
            perm=perm if o.windows == "stochastic" else None, layout=o.layout)

    def attend_cached(self, layer, x, q, k, v, key_mask):
        o = layer.options
        window = None if o.windows == "stochastic" else o.window
        return last_rows(q, k, lambda q_all: fractional.fractional_attention(
            q_all, k, v, o.alpha, eps=o.eps, causal=True, key_mask=key_mask, window=window,
            layout=o.layout))

    def mean_keys(self, options, n):
        if options.window is None:
            return (n + 1) / 2
        if options.windows == "stochastic":
            return stochastic_keys(n, options.window, layout=options.layout, sinks=0)
        return window_keys(n, options.window)
