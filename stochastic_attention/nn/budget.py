"""Attention budget of a method: the mean number of keys a query sees at a given length.

Counts come from the operators' own counting rules (:func:`stochastic_attention.attended_keys`,
:func:`..ops.moba.moba_attended_keys`, :func:`..ops.bigbird.bigbird_attended_keys`), so methods
can be compared at equal budget. Random methods are averaged over a few seeded draws.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..functional import attended_keys
from ..ops.bigbird import bigbird_attended_keys
from ..ops.moba import moba_attended_keys
from ..vocabulary import METHODS, check_name, reject_renamed
from .attention import MultiHeadAttention
from .options import MethodOptions, options_for

# Seeded draws averaged for the methods whose key sets are random (permutations, random keys).
BUDGET_SEEDS = 4


def _options(source, method: str) -> MethodOptions:
    """``method``'s options from a config, a layer, an options object or a mapping."""
    if isinstance(source, MultiHeadAttention):
        source = source.options
    if isinstance(source, MethodOptions):
        if source.method == method:
            return source
        source = source.to_dict()
    elif hasattr(source, "attention_methods"):  # an SALlamaConfig
        source = source.attention_options
    elif not isinstance(source, Mapping):
        raise TypeError("mean_attended_keys needs an SALlamaConfig, a MultiHeadAttention, an "
                        f"options object or a dict of options, got {type(source).__name__}")
    reject_renamed([k for k in source if k not in METHODS], "mean_attended_keys options")
    return options_for(method, source)


def mean_attended_keys(options, method: str, seq_len: int) -> float:
    """Mean keys per query of a ``method`` layer over a ``seq_len``-token causal sequence.

    ``options``: an :class:`SALlamaConfig` (its ``attention_options``), a
    :class:`MultiHeadAttention` or an options object (their options), or a mapping of options;
    ``method`` takes the fields it has and the defaults for the rest (the rule of
    :func:`~stochastic_attention.nn.options.options_for`). Rules per method: full
    ``(n + 1) / 2``; sliding_window a window plus sinks; stochastic the window (``layout``)
    plus sinks; stochastic_local that plus the last ``local`` positions, each key once; gated
    the union of its stochastic and sliding-window branches; moba ``moba_attended_keys`` plus
    the sinks outside the blocks it surely sees (an upper bound: a chosen earlier block may
    hold them); fractional its window (stochastic with ``windows="stochastic"``) or full;
    bigbird its window, sinks and distinct random keys.
    """
    check_name(method, METHODS)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    o = _options(options, method)
    n = seq_len

    def seeded(count) -> float:
        draws = [count(torch.Generator().manual_seed(seed)).float().mean()
                 for seed in range(BUDGET_SEEDS)]
        return float(torch.stack(draws).mean())

    def stochastic(window, local=0, sinks=None) -> float:
        sinks = o.sinks if sinks is None else sinks
        return seeded(lambda g: attended_keys(n, window, method="stochastic", generator=g,
                                              layout=o.layout, sinks=sinks, local=local))

    if method == "full" or (method == "fractional" and o.window is None):
        return (n + 1) / 2
    if method == "sliding_window":
        return float(attended_keys(n, o.window, method="sliding_window",
                                   sinks=o.sinks).float().mean())
    if method == "stochastic":
        return stochastic(o.window)
    if method == "stochastic_local":
        return stochastic(o.window, local=o.local)
    if method == "gated":  # the sliding-window branch is exactly a local window
        return stochastic(o.window, local=o.sliding_window)
    if method == "fractional":
        if o.windows == "stochastic":
            return stochastic(o.window, sinks=0)
        return float(attended_keys(n, o.window, method="sliding_window").float().mean())
    if method == "moba":
        block = o.block_size
        counts = moba_attended_keys(n, block, o.top_k).float()
        own = torch.div(torch.arange(n), block, rounding_mode="floor")
        # Sinks before the own block, unless every earlier block is chosen anyway.
        extra = torch.clamp(torch.minimum(own * block, torch.tensor(o.sinks)), min=0)
        counts = counts + torch.where(own >= o.top_k, extra, 0)
        return float(counts.mean())
    return seeded(lambda g: bigbird_attended_keys(n, o.window, o.random_keys, o.sinks,
                                                  generator=g))
