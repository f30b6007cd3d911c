"""Closed-form receptive fields to hold the measurements against.

- SWA: each layer extends the field by the band's reach, l*(w-1)+1 tokens for a causal query
  (clipped at the sequence ends).
- Idealised SA (the paper's argument): each layer links every token to w-1 uniformly random
  others, independently across layers, no causal mask. Mean field for the covered fraction f:
      1 - f_{l+1} = (1 - f_l) * (1 - (w-1)/(n-1)) ** (n f_l)
  (a token stays missing if it was missing and none of the n f_l reached tokens drew it).
  f grows like w^l while small, then the missing fraction falls doubly exponentially: full
  coverage after log_w n + O(log log n) layers.
- Causal SA alone: the token just before a causal query can reach it only directly (there is
  no position in between), which happens in a layer with probability (w-1)/(n-1) (it must share
  the query's permuted window), so the query needs on average (n-1)/(w-1) layers: as many as SWA.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops.patterns import band_extent


def swa_field_size(depth: int, window: int, seq_len: int, *, position: int = -1,
                   causal: bool = True) -> int:
    """Exact receptive field of ``position`` after ``depth`` SWA layers (the library's bands)."""
    position %= seq_len
    if window >= seq_len:  # full attention: every allowed key is a window-mate
        left, right = seq_len, (0 if causal else seq_len)
    else:
        left, right = band_extent(window, causal)
    # Information flows from key to query: sources lie up to `left` before and `right` after.
    return min(position, depth * left) + min(seq_len - 1 - position, depth * right) + 1


def swa_layers_to_full(window: int, seq_len: int, *, causal: bool = True) -> int:
    """Layers until the LAST token's SWA field covers the sequence."""
    left, _ = band_extent(min(window, seq_len), causal)
    return math.ceil((seq_len - 1) / left) if left else (0 if seq_len == 1 else math.inf)


def idealised_sa_fraction(window: int, seq_len: int, depth: int) -> np.ndarray:
    """Mean-field covered fraction after 0..depth layers of idealised (non-causal) SA."""
    f = np.empty(depth + 1)
    f[0] = 1.0 / seq_len
    log_keep = math.log1p(-(window - 1) / (seq_len - 1))
    for layer in range(depth):
        f[layer + 1] = 1.0 - (1.0 - f[layer]) * math.exp(seq_len * f[layer] * log_keep)
    return f


def idealised_sa_layers_to_full(window: int, seq_len: int, max_depth: int = 1000) -> int:
    """Median layers to full coverage in the mean field: the expected number of missing tokens
    (Poisson) must fall below ln 2 so that P(none missing) >= 1/2."""
    f = idealised_sa_fraction(window, seq_len, max_depth)
    hit = np.nonzero(seq_len * (1.0 - f) <= math.log(2))[0]
    return int(hit[0]) if hit.size else max_depth


def log_w(window: int, seq_len: int) -> float:
    """log_w n, the leading term of idealised SA's depth to full coverage."""
    return math.log(seq_len) / math.log(window)


def causal_sa_neighbour_layers(window: int, seq_len: int) -> tuple[float, float]:
    """(mean, median) layers before the token just before the last one reaches it under causal
    SA alone: geometric with success probability (w-1)/(n-1) per layer."""
    p = min(1.0, (window - 1) / (seq_len - 1))
    median = math.log(0.5) / math.log1p(-p) if p < 1 else 1.0
    return 1.0 / p, median
