"""Named stacks of layers: how each layer's pattern is drawn for a given attention scheme.

Patterns (one name per scheme, used by the CLI and the docs; the attention methods' names):
- ``sliding_window``: sliding window of ``window`` (the same pattern in every layer);
- ``stochastic`` / ``stochastic_block``: stochastic attention (band / block layout), a fresh
  permutation per layer;
- ``gated``: the gated layer's pattern, the union of a stochastic band window and a local
  window of ``local_window`` (default ``window``);
- ``moba``: MoBA-like routing, blocks of ``block_size`` (default window // 2), ``top_k`` blocks
  (default 2, so about ``window`` keys) chosen from random Gaussian q, k drawn per layer;
- ``dilated``: dilated windows whose dilation cycles through 1, w, w^2, ... (w = window), the
  deterministic way to an exponential receptive field;
- ``full``: full attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..vocabulary import RENAMED_METHODS, check_name
from .layers import Edges, dilated_edges, layer_edges, moba_edges

PATTERNS = ("sliding_window", "stochastic", "stochastic_block", "gated", "moba", "dilated", "full")
RANDOM_PATTERNS = ("stochastic", "stochastic_block", "gated", "moba")
# The former pattern names, for the errors that name the new ones.
RENAMED = {**RENAMED_METHODS, "sa_block": "stochastic_block"}


@dataclass(frozen=True)
class PatternSpec:
    """A scheme of attention layers; :meth:`layer` draws one layer's pattern."""

    name: str
    window: int
    causal: bool = True
    sinks: int = 0
    local_window: int | None = None
    block_size: int | None = None
    top_k: int = 2
    head_dim: int = 64

    def __post_init__(self) -> None:
        check_name(self.name, PATTERNS, what="pattern", renamed=RENAMED)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2 (a window of 1 never mixes tokens), "
                             f"got {self.window!r}")

    @property
    def random(self) -> bool:
        """Whether layers differ from draw to draw (Monte Carlo over seeds makes sense)."""
        return self.name in RANDOM_PATTERNS

    @property
    def label(self) -> str:
        return f"{self.name} ({'causal' if self.causal else 'non-causal'})"

    def layer(self, seq_len: int, index: int, generator: torch.Generator | None = None) -> Edges:
        """The pattern of layer ``index`` (0-based); random schemes draw from ``generator``."""
        w, common = self.window, {"causal": self.causal, "sinks": self.sinks}
        if self.name == "sliding_window":
            return layer_edges(seq_len, w, method="sliding_window", **common)
        if self.name == "full":
            return layer_edges(seq_len, w, method="full", **common)
        if self.name in ("stochastic", "stochastic_block", "gated"):
            layout = "block" if self.name == "stochastic_block" else "band"
            sa = layer_edges(seq_len, w, method="stochastic", layout=layout,
                             generator=generator, **common)
            if self.name == "stochastic" or self.name == "stochastic_block":
                return sa
            local = layer_edges(seq_len, self.local_window or w, method="sliding_window",
                                **common)
            return sa.union(local)
        if self.name == "moba":
            q = torch.randn(seq_len, self.head_dim, generator=generator)
            k = torch.randn(seq_len, self.head_dim, generator=generator)
            return moba_edges(q, k, self.block_size or max(1, w // 2), self.top_k,
                              causal=self.causal)
        levels = max(1, math.ceil(math.log(seq_len) / math.log(w)))  # dilated
        return dilated_edges(seq_len, w, w ** (index % levels), causal=self.causal)

    def deterministic_period(self, seq_len: int) -> int | None:
        """For non-random schemes, after how many layers the patterns repeat (None if random)."""
        if self.random:
            return None
        if self.name == "dilated":
            return max(1, math.ceil(math.log(seq_len) / math.log(self.window)))
        return 1


class LayerStack:
    """Draws layer patterns of one scheme in order, caching the repeating deterministic ones."""

    def __init__(self, spec: PatternSpec, seq_len: int, seed: int = 0) -> None:
        self.spec, self.seq_len = spec, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._period = spec.deterministic_period(seq_len)
        self._cache: dict[int, Edges] = {}

    def __call__(self, index: int) -> Edges:
        if self._period is None:
            return self.spec.layer(self.seq_len, index, self.generator)
        key = index % self._period
        if key not in self._cache:
            self._cache[key] = self.spec.layer(self.seq_len, index)
        return self._cache[key]
