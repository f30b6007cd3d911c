"""Rotary position embedding (RoPE), applied at ORIGINAL token positions.

Stochastic attention shuffles tokens inside the operator; rotating q and k here, before the
shuffle, is what keeps order information alive in the permuted windows.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Llama-style RoPE (rotate-half convention) over the full head dimension."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        if theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {theta}")
        # Frequencies are recomputed per call (cheap) rather than kept in a buffer, so models
        # materialised from the meta device or from checkpoints never miss them.
        self.head_dim, self.theta = head_dim, float(theta)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [B, Hq, L, D] and k [B, Hk, L, D] by ``positions`` [B|1, L]."""
        # float32, or float64 for float64 inputs (gradcheck needs the input's precision).
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        exponents = torch.arange(0, self.head_dim, 2, device=q.device, dtype=dt)
        inv_freq = 1.0 / self.theta ** (exponents / self.head_dim)
        angles = positions[:, None, :, None].to(dt) * inv_freq  # [B, 1, L, D/2]
        cos = torch.cat([angles.cos()] * 2, dim=-1)
        sin = torch.cat([angles.sin()] * 2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)
