"""Layers (nn.Module): attention with a choice of method, each method's options, the gate,
rotary embedding, cache; the attention budget of each method."""

from ..vocabulary import METHODS
from .attention import MultiHeadAttention, cached_attention
from .budget import mean_attended_keys
from .cache import KVCache
from .gate import BranchGate
from .options import (
    OPTIONS,
    BigBirdOptions,
    FractionalOptions,
    FullOptions,
    GatedOptions,
    MethodOptions,
    MobaOptions,
    SlidingWindowOptions,
    StochasticLocalOptions,
    StochasticOptions,
)
from .rotary import RotaryEmbedding

__all__ = ["METHODS", "OPTIONS", "BigBirdOptions", "BranchGate", "FractionalOptions",
           "FullOptions", "GatedOptions", "KVCache", "MethodOptions", "MobaOptions",
           "MultiHeadAttention", "RotaryEmbedding", "SlidingWindowOptions",
           "StochasticLocalOptions", "StochasticOptions", "cached_attention",
           "mean_attended_keys"]
