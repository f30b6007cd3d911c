"""stochastic_local: stochastic attention whose windows also hold each query's last ``local``
positions (one softmax over the union). Decodes as stochastic does (the sampled decode keeps
the last ``local`` tokens)."""

from __future__ import annotations

from dataclasses import dataclass

from ...functional import stochastic_attention
from .base import check_int, full_or_sampled_decode, stochastic_keys
from .registry import register
from .stochastic import Stochastic, StochasticOptions


@dataclass(frozen=True, kw_only=True)
class StochasticLocalOptions(StochasticOptions):
    """Stochastic attention whose windows also hold each query's last ``local`` positions
    (one softmax over the union)."""

    method = "stochastic_local"
    local: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("local", self.local, 1, " (recent positions every query sees; method "
                                          "'stochastic' is stochastic attention without them)")


@register
class StochasticLocal(Stochastic):
    options_class = StochasticLocalOptions

    def attend(self, layer, x, q, k, v, key_mask, perm):
        o = layer.options
        # The union runs on the blocked (or reference) backend only: a model-wide "flex"
        # backend falls back to "blocked" for these layers instead of failing.
        backend = "blocked" if layer.backend == "flex" else layer.backend
        return stochastic_attention(q, k, v, o.window, perm=perm, layout=o.layout,
                                    sinks=o.sinks, local=o.local,
                                    key_mask=key_mask, backend=backend)

    def attend_cached(self, layer, x, q, k, v, key_mask):
        o = layer.options
        return full_or_sampled_decode(layer, q, k, v, key_mask, window=o.window,
                                      local=max(o.local, 1))

    def mean_keys(self, options, n):
        return stochastic_keys(n, options.window, layout=options.layout, sinks=options.sinks,
                               local=options.local)
