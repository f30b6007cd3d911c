"""bigbird: a causal window, the first ``sinks`` tokens and ``random_keys`` random earlier keys
per query. Cached decoding attends to the whole cache, or with ``decode="stochastic"`` to the
window and ``random_keys`` random cached keys."""

from __future__ import annotations

from dataclasses import dataclass

from ...ops import bigbird
from .base import (
    DECODES,
    Method,
    SamplingOptions,
    check_choice,
    check_int,
    check_sinks,
    check_window,
    full_or_sampled_decode,
    seeded_mean,
)
from .registry import register


@dataclass(frozen=True, kw_only=True)
class BigBirdOptions(SamplingOptions):
    """BigBird: a causal window of ``window`` keys, the first ``sinks`` tokens and
    ``random_keys`` random earlier keys per query (drawn per sample, shared by the heads unless
    ``perm_per_head``). decode "stochastic": the window and ``random_keys`` random cached keys."""

    method = "bigbird"
    window: int = 64
    random_keys: int = 0
    sinks: int = 0
    decode: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window(self.window)
        check_int("random_keys", self.random_keys, 0)
        check_sinks(self.sinks)
        check_choice("decode", self.decode, DECODES)


@register
class BigBird(Method):
    options_class = BigBirdOptions
    draws_random_keys = True

    def draw_random_keys(self, layer, batch, seq_len, device, key_mask):
        o = layer.options
        heads = layer.num_heads if o.perm_per_head else 1
        return bigbird.bigbird_indices(batch, heads, seq_len, o.window, o.random_keys,
                                       sinks=o.sinks, generator=layer.sampling_generator(),
                                       device=device, key_mask=key_mask)

    def attend(self, layer, x, q, k, v, key_mask, perm):
        o = layer.options
        indices = layer.draw_random_keys(q.shape[0], q.shape[2], q.device, key_mask)
        return bigbird.bigbird_attention(q, k, v, o.window, o.random_keys, sinks=o.sinks,
                                         key_mask=key_mask, indices=indices)

    def attend_cached(self, layer, x, q, k, v, key_mask):
        o = layer.options
        return full_or_sampled_decode(layer, q, k, v, key_mask, window=o.random_keys,
                                      local=o.window)

    def mean_keys(self, options, n):
        return seeded_mean(lambda g: bigbird.bigbird_attended_keys(
            n, options.window, options.random_keys, options.sinks, generator=g))
