"""A small bidirectional encoder for sequence classification, with softmax or fractional attention.

Token embedding + sinusoidal positions, ``n_layers`` pre-norm blocks (self-attention, then an
optional MLP), mean pooling over real tokens, a linear head. The attention of every block is
``"softmax"`` (scaled dot products) or ``"fractional"`` (Fractional Neural Attention of order
``alpha``); with ``window`` it runs inside sliding windows (``windows="sliding_window"``), or
inside stochastic-attention windows (a fresh random permutation per call) with
``windows="stochastic"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from ..functional import random_permutation, sliding_window_attention, stochastic_attention
from ..ops.fractional import fractional_attention, fractional_weights
from ..ops.patterns import dense_mask
from ..vocabulary import check_name

ATTENTIONS = ("softmax", "fractional")
WINDOWS = ("sliding_window", "stochastic")
# Former names of the classifier's options (the experiment YAML's variants), with the new ones.
RENAMED_OPTIONS = {"stochastic": "windows: stochastic"}


@dataclass
class ClassifierConfig:
    vocab_size: int
    num_classes: int
    d_model: int = 16
    n_layers: int = 1
    n_heads: int = 1
    attention: str = "fractional"
    alpha: float = 1.2
    eps: float = 1.0
    scale: float | str | None = None  # FNA distance scale (None: the default rule)
    orthogonal_qk: bool = False
    mlp: bool = True
    dropout: float = 0.0
    window: int | None = None
    windows: str = "sliding_window"

    def __post_init__(self) -> None:
        check_name(self.attention, ATTENTIONS, what="attention")
        if self.windows not in WINDOWS:
            raise ValueError(f"windows must be one of {WINDOWS}, got {self.windows!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.windows == "stochastic" and self.window is None:
            raise ValueError("windows='stochastic' needs a window (the number of keys per query)")


def sinusoidal_positions(n: int, d: int, device=None) -> torch.Tensor:
    """[n, d] fixed sin/cos position codes (any length, no parameters)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return pe


class EncoderSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with a choice of kernel."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.head_dim = d // cfg.n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        if cfg.orthogonal_qk:  # the paper's "orthogonal" variant: distances are preserved
            self.q_proj = orthogonal(self.q_proj)
            self.k_proj = orthogonal(self.k_proj)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, n, _ = x.shape
        H, Dh = self.cfg.n_heads, self.head_dim
        return tuple(p(x).view(B, n, H, Dh).transpose(1, 2)
                     for p in (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        q, k, v = self._heads(x)
        B, H, n, _ = q.shape
        perm = None
        if cfg.windows == "stochastic":
            perm = random_permutation(B, H, n, device=x.device)
        if cfg.attention == "fractional":
            out = fractional_attention(q, k, v, cfg.alpha, eps=cfg.eps, scale=cfg.scale,
                                       key_mask=key_mask, window=cfg.window,
                                       perm=perm)
        elif cfg.window is None:
            out = sliding_window_attention(q, k, v, n, causal=False,
                                           key_mask=key_mask)
        elif perm is None:
            out = sliding_window_attention(q, k, v, cfg.window, causal=False,
                                           key_mask=key_mask)
        else:
            out = stochastic_attention(q, k, v, cfg.window, perm=perm, causal=False,
                                       key_mask=key_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, n, -1))

    @torch.no_grad()
    def weights(self, x: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The full attention matrix [B, H, n, n] (rows sum to 1), for analysis. O(n^2).

        Windows are ignored: this is the graph of the kernel over the whole sequence.
        """
        q, k, _ = self._heads(x)
        if self.cfg.attention == "fractional":
            return fractional_weights(q, k, self.cfg.alpha, eps=self.cfg.eps,
                                      scale=self.cfg.scale, key_mask=key_mask)
        n = q.shape[2]
        mask = dense_mask(n, n, causal=False, key_mask=key_mask, device=x.device)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d)
        self.attn = EncoderSelfAttention(cfg)
        self.mlp = None
        if cfg.mlp:
            self.norm2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.norm2(x)))
        return x


class EncoderClassifier(nn.Module):
    """tokens [B, n] (long) -> class logits [B, num_classes]."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a LongTensor [batch, seq], got {tuple(tokens.shape)}"
                             f" {tokens.dtype}")
        n = tokens.shape[1]
        return self.embed(tokens) + sinusoidal_positions(n, self.cfg.d_model, tokens.device)

    def forward(self, tokens: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.norm(x)
        if key_mask is None:
            pooled = x.mean(dim=1)
        else:  # mean over real tokens only
            m = key_mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(F.dropout(pooled, self.cfg.dropout, self.training))

    @torch.no_grad()
    def attention_weights(self, tokens: torch.Tensor, layer: int = 0,
                          key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The dense attention matrix [B, H, n, n] of block ``layer`` on ``tokens``."""
        x = self.embed_tokens(tokens)
        for block in self.blocks[:layer]:
            x = block(x, key_mask)
        block = self.blocks[layer]
        return block.attn.weights(block.norm1(x), key_mask)
