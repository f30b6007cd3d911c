"""Attention budget of a method: the mean number of keys a query sees at a given length.

Each method module's ``mean_keys`` counts with the operators' own counting rules
(:func:`stochastic_attention.attended_keys`, :func:`..ops.moba.moba_attended_keys`,
:func:`..ops.bigbird.bigbird_attended_keys`), so methods can be compared at equal budget.
Random methods are averaged over a few seeded draws (:data:`BUDGET_SEEDS`).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..vocabulary import reject_renamed
from .attention import MultiHeadAttention
from .methods import method_named, method_names
from .methods.base import BUDGET_SEEDS
from .options import MethodOptions, options_for

__all__ = ["BUDGET_SEEDS", "mean_attended_keys"]


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
    reject_renamed([k for k in source if k not in method_names()], "mean_attended_keys options")
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
    bigbird its window, sinks and distinct random keys. Each rule is its method module's
    ``mean_keys`` (:mod:`stochastic_attention.nn.methods`).
    """
    impl = method_named(method)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return impl.mean_keys(_options(options, method), seq_len)
