"""Attention budget of a layer kind: the mean number of keys a query sees at a given length.

Counts come from the operators' own counting rules (:func:`stochastic_attention.attended_keys`,
:func:`..ops.moba.moba_attended_keys`, :func:`..ops.bigbird.bigbird_attended_keys`), so kinds
can be compared at equal budget. Random kinds are averaged over a few seeded draws.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..functional import attended_keys
from ..ops.bigbird import bigbird_attended_keys
from ..ops.moba import moba_attended_keys
from .attention import KINDS, MultiHeadAttention

# Seeded draws averaged for the kinds whose key sets are random (SA windows, BigBird keys).
BUDGET_SEEDS = 4

# MultiHeadAttention's defaults for the options that matter here.
DEFAULTS = dict(window=64, sa_window=None, swa_window=None, sinks=0, layout="band", local=0,
                random_keys=0, moba_block_size=64, moba_topk=2, fna_window=None,
                fna_stochastic=False)


def _options(source) -> dict:
    """The budget-relevant options of a config, a layer or a mapping of layer options."""
    if isinstance(source, MultiHeadAttention):
        block_size, topk = source.moba
        return dict(window=source.sa_window, sa_window=source.sa_window,
                    swa_window=source.swa_window, sinks=source.sinks, layout=source.layout,
                    local=source.local, random_keys=source.random_keys,
                    moba_block_size=block_size, moba_topk=topk, fna_window=source.fna[2],
                    fna_stochastic=source.fna_stochastic)
    if isinstance(source, Mapping):
        get = source.get
    elif hasattr(source, "attention_kinds"):  # an SALlamaConfig
        def get(name, default):
            return getattr(source, name, default)
    else:
        raise TypeError("mean_attended_keys needs an SALlamaConfig, a MultiHeadAttention or a "
                        f"dict of layer options, got {type(source).__name__}")
    return {name: get(name, default) for name, default in DEFAULTS.items()}


def mean_attended_keys(config_or_layer_options, kind: str, seq_len: int) -> float:
    """Mean keys per query of a ``kind`` layer over a ``seq_len``-token causal sequence.

    ``config_or_layer_options``: an :class:`SALlamaConfig`, a :class:`MultiHeadAttention` or a
    mapping of its options (missing ones take the layer's defaults). Rules per kind: full
    ``(n + 1) / 2``; swa a window of ``swa_window`` plus sinks; sa the SA window (``layout``) plus
    sinks; sa_local that plus the last ``local`` positions, each key once; gated the union of
    its SA and SWA branches; moba ``moba_attended_keys`` plus the sinks outside the blocks it
    surely sees (an upper bound: a chosen earlier block may hold them); fna its window (SA-style with
    ``fna_stochastic``) or full; bigbird its window, sinks and distinct random keys.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    o = _options(config_or_layer_options)
    n, sinks = seq_len, o["sinks"]
    sa_window = o["sa_window"] or o["window"]
    swa_window = o["swa_window"] or o["window"]

    def seeded(count) -> float:
        draws = [count(torch.Generator().manual_seed(seed)).float().mean()
                 for seed in range(BUDGET_SEEDS)]
        return float(torch.stack(draws).mean())

    def sa(window, local=0, layout=o["layout"], sinks=sinks) -> float:
        return seeded(lambda g: attended_keys(n, window, method="stochastic", generator=g,
                                              layout=layout, sinks=sinks, local=local))

    if kind == "full" or (kind == "fna" and o["fna_window"] is None):
        return (n + 1) / 2
    if kind == "swa":
        return float(attended_keys(n, swa_window, method="sliding_window",
                                   sinks=sinks).float().mean())
    if kind == "sa":
        return sa(sa_window)
    if kind == "sa_local":
        return sa(sa_window, local=o["local"])
    if kind == "gated":  # the SWA branch is exactly a local window of swa_window
        return sa(sa_window, local=swa_window)
    if kind == "fna":
        if o["fna_stochastic"]:
            return sa(o["fna_window"], sinks=0)
        return float(attended_keys(n, o["fna_window"], method="sliding_window").float().mean())
    if kind == "moba":
        block = o["moba_block_size"]
        counts = moba_attended_keys(n, block, o["moba_topk"]).float()
        own = torch.div(torch.arange(n), block, rounding_mode="floor")
        # Sinks before the own block, unless every earlier block is chosen anyway.
        extra = torch.clamp(torch.minimum(own * block, torch.tensor(sinks)), min=0)
        counts = counts + torch.where(own >= o["moba_topk"], extra, 0)
        return float(counts.mean())
    return seeded(lambda g: bigbird_attended_keys(n, swa_window, o["random_keys"], sinks,
                                                  generator=g))
