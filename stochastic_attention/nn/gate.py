"""The fusion gate of the gated SA + SWA layer.

Two branch outputs a (SA) and b (SWA), [B, H, L, D], are mixed with gates computed from the
layer input x: ``sigmoid(x W_a) * a + sigmoid(x W_b) * b`` (two independent gates, the paper's
choice) or, for the ablation, a softmax over the pair (a convex combination).
"""

from __future__ import annotations

import torch
from torch import nn

GATES = ("sigmoid", "softmax")
GATE_GRANULARITIES = ("head", "channel")


class BranchGate(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        gate: str = "sigmoid",
        granularity: str = "head",
        bias: float | tuple[float, float] = 0.0,
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if granularity not in GATE_GRANULARITIES:
            raise ValueError(
                f"gate_granularity must be one of {GATE_GRANULARITIES}, got {granularity!r}")
        biases = (bias, bias) if isinstance(bias, (int, float)) else tuple(bias)
        if len(biases) != 2:
            raise ValueError(f"gate_bias must be a float or a pair (stochastic, sliding_window), got {bias!r}")
        self.gate, self.num_heads = gate, num_heads
        self.width = 1 if granularity == "head" else head_dim
        self.proj = nn.Linear(hidden_size, 2 * num_heads * self.width)
        self.bias_init = (float(biases[0]), float(biases[1]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, std=0.02)
        with torch.no_grad():
            self.proj.bias.view(2, -1)[0].fill_(self.bias_init[0])
            self.proj.bias.view(2, -1)[1].fill_(self.bias_init[1])

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stochastic gate, sliding-window gate), each [B, H, L, 1 or D], from x [B, L, hidden]."""
        B, L, _ = x.shape
        logits = self.proj(x).view(B, L, 2, self.num_heads, self.width).permute(2, 0, 3, 1, 4)
        g = logits.sigmoid() if self.gate == "sigmoid" else logits.softmax(dim=0)
        return g[0], g[1]

    def forward(self, x: torch.Tensor, stochastic: torch.Tensor,
                sliding: torch.Tensor) -> torch.Tensor:
        g_stochastic, g_sliding = self.gates(x)
        return g_stochastic.to(stochastic.dtype) * stochastic + g_sliding.to(sliding.dtype) * sliding
