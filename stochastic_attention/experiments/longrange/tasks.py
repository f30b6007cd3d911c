"""Seeded generators for the long-range tasks: global aggregation (majority) and MQAR.

Each generator returns ``(inputs, labels)``: ``inputs`` [num, seq_len] token ids and ``labels``
[num, seq_len] with the id the model must predict at a position and -100 where nothing is
scored, aligned with the inputs (the model's output at position ``i`` is scored against
``labels[:, i]``; no shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100

# Majority: token ids.
ZERO, ONE, QUERY = 1, 2, 3
MAJORITY_VOCAB = 4


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    margins: torch.Tensor  # per example: majority margin (majority) or 0 (MQAR)


def majority_bit_counts(n_bits: int, margin: float) -> tuple[int, int]:
    """(minority, majority) counts whose difference is the nearest valid one to margin * n_bits.

    The difference always has the parity of ``n_bits`` and is at least 1 (2 when n_bits is even),
    so the majority is never a tie.
    """
    if n_bits < 1:
        raise ValueError(f"n_bits must be >= 1, got {n_bits}")
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    target = margin * n_bits
    parity = n_bits % 2
    # The nearest difference with the parity of n_bits, between the smallest (1 or 2) and n_bits.
    options = range(2 - parity, n_bits + 1, 2)
    diff = min(options, key=lambda d: (abs(d - target), d))
    return (n_bits - diff) // 2, (n_bits + diff) // 2


def majority(num: int, seq_len: int, margins: float | list[float], *, seed: int | list[int]) -> Batch:
    """Majority of random bits: ``seq_len - 1`` bits, then a query token whose label is the majority.

    Every example has exactly ``majority - minority = round(margin * bits)`` (see
    :func:`majority_bit_counts`), with the margin drawn uniformly from ``margins``, and the
    majority bit drawn fairly, so the answer depends on every bit: any sample of ``r`` of the
    bits predicts it with probability about ``Phi(margin * sqrt(r))`` (see :func:`sample_ceiling`).
    Only the query position is scored.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (bits then a query), got {seq_len}")
    margins = [margins] if isinstance(margins, (int, float)) else list(margins)
    rng = np.random.default_rng(seed)
    n_bits = seq_len - 1
    inputs = np.full((num, seq_len), QUERY, dtype=np.int64)
    labels = np.full((num, seq_len), IGNORE, dtype=np.int64)
    drawn = rng.choice(len(margins), size=num)
    major = rng.integers(0, 2, size=num)
    for row in range(num):
        minority, majority_count = majority_bit_counts(n_bits, margins[drawn[row]])
        bits = np.zeros(n_bits, dtype=np.int64)
        bits[:majority_count] = 1
        rng.shuffle(bits)
        if major[row] == 0:
            bits = 1 - bits
        inputs[row, :-1] = np.where(bits == 1, ONE, ZERO)
        labels[row, -1] = ONE if major[row] == 1 else ZERO
    margin_values = torch.tensor([margins[i] for i in drawn], dtype=torch.float64)
    return Batch(torch.from_numpy(inputs), torch.from_numpy(labels), margin_values)


def sample_ceiling(n_bits: int, margin: float, reach: int) -> float:
    """Best accuracy of predicting the majority of ``n_bits`` from ``reach`` of them.

    The bits seen are a uniform sample without replacement (hypergeometric); the best rule
    is the sample's majority (a tie is a coin flip). ``reach >= n_bits`` gives 1. This is the
    ceiling of any model that can see only ``reach`` bits, e.g. SWA's last token after L
    layers (``reach = L * (window - 1) + 1`` tokens, one of them the query).
    """
    from scipy.stats import hypergeom

    minority, major = majority_bit_counts(n_bits, margin)
    r = max(0, min(reach, n_bits))
    if r >= n_bits:
        return 1.0
    dist = hypergeom(n_bits, major, r)  # number of majority bits in the sample
    ks = np.arange(0, r + 1)
    p = dist.pmf(ks)
    win = p[2 * ks > r].sum() + 0.5 * p[2 * ks == r].sum()
    return float(win)


def mqar(num: int, seq_len: int, pairs: int, vocab: int, *, seed: int | list[int], power_a: float = 0.01,
         random_filler: bool = True) -> Batch:
    """Multi-query associative recall, after Zoology's protocol (Arora et al. 2023).

    Keys come from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``, each key once per
    example. The sequence opens with the ``pairs`` key-value pairs; then every key is queried
    once, at an even offset ``2 * gap`` of the query section, where the gaps are distinct and
    follow the power law ``p(g) ~ g ** (power_a - 1)`` (small gaps favoured). The label at a
    query is the value that followed that key. Other query-section positions hold random
    tokens (``random_filler``) or 0.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if seq_len % 2 or 4 * pairs > seq_len:
        raise ValueError(f"seq_len must be even and >= 4 * pairs ({4 * pairs}), got {seq_len}")
    if vocab <= seq_len and vocab < 2 * pairs + 2:
        raise ValueError(f"vocab ({vocab}) too small for {pairs} pairs")
    if vocab // 2 - 1 < pairs:
        raise ValueError(f"vocab/2 - 1 keys ({vocab // 2 - 1}) must be >= pairs ({pairs})")
    rng = np.random.default_rng(seed)
    context = 2 * pairs
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    inputs = np.zeros((num, seq_len), dtype=np.int64)
    labels = np.full((num, seq_len), IGNORE, dtype=np.int64)
    half = vocab // 2
    for row in range(num):
        keys = rng.choice(np.arange(1, half), size=pairs, replace=False)
        values = rng.choice(np.arange(half, vocab), size=pairs, replace=False)
        gaps = rng.choice(space, size=pairs, replace=False, p=p)
        if random_filler:
            inputs[row] = rng.integers(0, vocab, size=seq_len)
        else:
            inputs[row] = 0
        inputs[row, 0:context:2] = keys
        inputs[row, 1:context:2] = values
        at = context + 2 * gaps
        inputs[row, at] = keys
        labels[row, at] = values
    return Batch(torch.from_numpy(inputs), torch.from_numpy(labels),
                 torch.zeros(num, dtype=torch.float64))


def normal_ceiling(margin: float, reach: int) -> float:
    """Large-n approximation of :func:`sample_ceiling`: Phi(margin * sqrt(reach))."""
    return 0.5 * (1 + math.erf(margin * math.sqrt(max(reach, 0)) / math.sqrt(2)))
