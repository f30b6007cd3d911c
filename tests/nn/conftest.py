"""Fixtures of the layer tests: small seeded float64 layers."""

from __future__ import annotations

import pytest
import torch

from stochastic_attention.nn import OPTIONS, MultiHeadAttention


class Layers:
    """Seeded float64 ``MultiHeadAttention`` layers of one small shape: head_dim 6, GQA groups of 2."""

    hidden, heads, kv_heads = 24, 4, 2
    layer_keywords = ("qk_norm", "layer_idx", "backend")  # the rest are the method's options

    def make(self, method: str, **kw) -> MultiHeadAttention:
        torch.manual_seed(0)
        layer_kw = {name: kw.pop(name) for name in self.layer_keywords if name in kw}
        if "window" in OPTIONS[method].names() and method != "fractional":
            kw.setdefault("window", 5)  # fractional's default (None) is full attention
        return MultiHeadAttention(self.hidden, self.heads, num_kv_heads=self.kv_heads, method=method,
                                  options=kw, **layer_kw).double()


@pytest.fixture
def layers() -> Layers:
    return Layers()
