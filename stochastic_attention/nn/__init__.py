"""Layers (nn.Module): attention with a choice of method, each method's options, the gate,
rotary embedding, cache; the attention budget of each method. Each method is one module of
:mod:`.methods` (options, how it attends, its budget), found through its registry."""

from ..vocabulary import METHODS
from .attention import MultiHeadAttention, cached_attention
from .budget import mean_attended_keys
from .cache import KVCache
from .gate import BranchGate
from .methods import Method, method_names, register, unregister
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
           "FullOptions", "GatedOptions", "KVCache", "Method", "MethodOptions", "MobaOptions",
           "MultiHeadAttention", "RotaryEmbedding", "SlidingWindowOptions",
           "StochasticLocalOptions", "StochasticOptions", "cached_attention",
           "mean_attended_keys", "method_names", "register", "unregister"]
