"""stochastic-attention: random-permutation windowed attention in linear time."""

from .functional import (
    BACKENDS,
    attended_keys,
    random_permutation,
    sliding_window_attention,
    stochastic_attention,
)
from .ops.bigbird import bigbird_attention
from .ops.fractional import fractional_attention, fractional_weights
from .ops.moba import moba_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "attended_keys",
    "bigbird_attention",
    "fractional_attention",
    "fractional_weights",
    "moba_attention",
    "random_permutation",
    "sliding_window_attention",
    "stochastic_attention",
]
