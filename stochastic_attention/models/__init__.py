"""Models: released pretrained causal LMs (and, later, models trained from scratch)."""

from .pretrained import load_pretrained

__all__ = ["load_pretrained"]
