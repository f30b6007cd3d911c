"""Layers (nn.Module): attention with a choice of operator, its gate, rotary embedding, cache."""

from .attention import KINDS, MultiHeadAttention, cached_attention
from .cache import KVCache
from .gate import BranchGate
from .rotary import RotaryEmbedding

__all__ = ["KINDS", "BranchGate", "KVCache", "MultiHeadAttention", "RotaryEmbedding",
           "cached_attention"]
