"""gated: a stochastic branch and a sliding-window branch on the same q/k/v, fused by gates
computed from the layer input (:class:`~stochastic_attention.nn.BranchGate`, built on the
layer as ``layer.gate``).

Cached decoding: the stochastic branch decodes as stochastic does; the sliding-window branch
keeps its window (with ``decode="stochastic"`` gathered, so the layer decodes in O(window)).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...functional import sliding_window_attention
from ...ops import decode
from ...ops.decode import cached_attention
from ..gate import GATE_GRANULARITIES, GATES, BranchGate
from .base import check_choice, check_int, stochastic_keys
from .registry import register
from .stochastic import Stochastic, StochasticOptions


@dataclass(frozen=True, kw_only=True)
class GatedOptions(StochasticOptions):
    """A stochastic branch (``window``) and a sliding-window branch (``local_window``, default
    ``window``) on the same q/k/v, fused by gates (see :class:`~stochastic_attention.nn.
    BranchGate`): ``gate`` "sigmoid" or "softmax", ``gate_granularity`` "head" or "channel",
    ``gate_bias`` the initial gate bias (a float or a pair: stochastic, sliding-window).
    ``sinks`` apply to both branches, ``decode`` to the stochastic one."""

    method = "gated"
    local_window: int | None = None
    gate: str = "sigmoid"
    gate_granularity: str = "head"
    gate_bias: float | tuple[float, float] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.local_window is not None:
            check_int("local_window", self.local_window, 1, " (keys per query of the "
                                                            "sliding-window branch; None: window)")
        check_choice("gate", self.gate, GATES)
        check_choice("gate_granularity", self.gate_granularity, GATE_GRANULARITIES)
        bias = self.gate_bias
        if isinstance(bias, list):
            object.__setattr__(self, "gate_bias", bias := tuple(bias))
        pair = bias if isinstance(bias, tuple) else (bias,)
        if (isinstance(bias, tuple) and len(bias) != 2) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) for b in pair):
            raise ValueError(f"gate_bias must be a float or a pair (stochastic, sliding_window), "
                             f"got {self.gate_bias!r}")

    @property
    def sliding_window(self) -> int:
        """Keys per query of the sliding-window branch."""
        return self.local_window or self.window


@register
class Gated(Stochastic):
    options_class = GatedOptions

    def build(self, layer):
        o = layer.options
        layer.gate = BranchGate(layer.hidden_size, layer.num_heads, layer.head_dim, gate=o.gate,
                                granularity=o.gate_granularity, bias=o.gate_bias)

    def attend(self, layer, x, q, k, v, key_mask, perm):
        o = layer.options
        out = super().attend(layer, x, q, k, v, key_mask, perm)
        sliding = sliding_window_attention(q, k, v, o.sliding_window, sinks=o.sinks,
                                           key_mask=key_mask, backend=layer.backend)
        return layer.gate(x, out, sliding)

    def attend_cached(self, layer, x, q, k, v, key_mask):
        o = layer.options
        full = super().attend_cached(layer, x, q, k, v, key_mask)
        if o.decode == "stochastic":
            # the same keys as cached_attention's band + sinks, gathered: the whole layer then
            # decodes in O(window) per token
            sliding = decode.sparse_decode(q, k, v, key_mask, window=0, sinks=o.sinks,
                                           local=o.sliding_window)
        else:
            sliding = cached_attention(q, k, v, o.sliding_window, o.sinks, key_mask)
        return layer.gate(x, full, sliding)

    def mean_keys(self, options, n):
        # the sliding-window branch is exactly a local window
        return stochastic_keys(n, options.window, layout=options.layout, sinks=options.sinks,
                               local=options.sliding_window)
