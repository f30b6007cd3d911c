"""Layers (nn.Module): attention with a choice of operator, its gate, rotary embedding, cache;
the attention budget of each kind."""

from .attention import KINDS, MultiHeadAttention, cached_attention
from .budget import mean_attended_keys
from .cache import KVCache
from .gate import BranchGate
from .rotary import RotaryEmbedding

__all__ = ["KINDS", "BranchGate", "KVCache", "MultiHeadAttention", "RotaryEmbedding",
           "cached_attention", "mean_attended_keys"]
