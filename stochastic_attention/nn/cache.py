"""A minimal key/value cache for incremental decoding.

It has the interface of Hugging Face's ``DynamicCache`` that the attention layer uses
(``update`` and ``get_seq_length``), so either can be passed as ``cache``.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer seen so far, concatenated along the sequence."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, H, L, D] keys and values for ``layer_idx``; return all cached so far."""
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0
