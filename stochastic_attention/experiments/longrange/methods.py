"""Methods of the long-range benchmark, each set to the same mean attended keys per query.

A method's options are chosen so that its mean number of attended keys per query (counted with
the operators' own visibility rules) is as close as possible to ``budget``, the window of the
sliding-window baseline: comparisons are at equal attention cost, not at equal nominal window.
The benchmark's methods are the layer methods, plus ``stochastic_block`` (stochastic with
layout="block") and ``random`` (an ablation: random earlier keys per query, see below).
"""

from __future__ import annotations

import functools

import torch

from ...functional import attended_keys
from ...ops.moba import moba_attended_keys
from ...vocabulary import RENAMED_METHODS, check_name

METHODS = ("full", "sliding_window", "stochastic", "stochastic_block", "stochastic_local", "gated",
           "moba", "bigbird", "random")
# The benchmark's own former names, on top of the package's.
RENAMED = {**RENAMED_METHODS, "sa_block": "stochastic_block"}


def _sa_keys(n: int, window: int, layout: str = "band", local: int = 0) -> float:
    # One seeded routing: with a generator, every row of a batch draws the same routing (each
    # row starts from a copy of the generator's state), so more rows would add no draws.
    gen = torch.Generator().manual_seed(0)
    counts = attended_keys(n, window, method="stochastic", generator=gen, layout=layout,
                           local=local)
    return float(counts.float().mean())


def _bigbird_keys(n: int, window: int, random_keys: int, sinks: int) -> float:
    from ...ops.bigbird import bigbird_attended_keys

    return float(bigbird_attended_keys(n, window, random_keys, sinks).float().mean())


def _closest_window(n: int, budget: float, count) -> int:
    """The window whose count(window) is closest to budget (counts grow with the window)."""
    best, best_gap = 1, float("inf")
    lo, hi = 1, max(2, n)
    while lo <= hi:  # binary search for the crossing, then compare its two sides
        mid = (lo + hi) // 2
        if count(mid) < budget:
            lo = mid + 1
        else:
            hi = mid - 1
    for w in {max(1, lo - 1), lo, min(n, lo + 1)}:
        gap = abs(count(w) - budget)
        if gap < best_gap:
            best, best_gap = w, gap
    return best


@functools.cache
def method_options(method: str, budget: int,
                   seq_len: int) -> tuple[str, tuple[tuple[str, object], ...]]:
    """(layer method, SALlamaConfig attention options) for a benchmark method at a key budget."""
    check_name(method, METHODS, renamed=RENAMED)
    n = seq_len
    if method == "full":
        return "full", ()
    if method == "sliding_window":
        return "sliding_window", (("window", budget),)
    if method in ("stochastic", "stochastic_block"):
        layout = "block" if method == "stochastic_block" else "band"
        w = _closest_window(n, budget, lambda w: _sa_keys(n, w, layout))
        return "stochastic", (("layout", layout), ("window", w))
    if method == "stochastic_local":
        local = max(1, budget // 2)
        w = _closest_window(n, budget, lambda w: _sa_keys(n, w, local=local))
        return "stochastic_local", (("local", local), ("window", w))
    if method == "gated":
        # The gate mixes a stochastic branch and a sliding-window branch: their union costs
        # the budget.
        sliding = max(1, budget // 2)
        w = _closest_window(n, budget, lambda w: _sa_keys(n, w, local=sliding))
        return "gated", (("local_window", sliding), ("window", w))
    if method == "moba":
        # Own block (causal, about (block + 1) / 2 keys) plus top_k - 1 earlier full blocks;
        # blocks of at least 4 keys so that the router has something to average.
        pairs = [(b, t) for b in range(min(4, budget), budget + 1) for t in range(2, budget + 2)]
        block, top_k = min(pairs, key=lambda bt: (abs(bt[0] * (bt[1] - 1) + (bt[0] + 1) / 2
                                                      - budget), -bt[0]))
        return "moba", (("block_size", block), ("top_k", top_k))
    if method == "bigbird":
        sinks = 2
        local = max(1, budget // 2)
        rand = max(0, round(budget - local - sinks))
        return "bigbird", (("random_keys", rand), ("sinks", sinks), ("window", local))
    # "random": an ablation of SA's permutation: each query draws its own random earlier keys
    # (a BigBird layer with no global tokens and the smallest window: itself and its
    # predecessor), where SA's window-mates are shared groups of one permutation.
    window = min(2, budget)
    rand = _closest_window(n, budget, lambda r: _bigbird_keys(n, window, r, 0))
    return "bigbird", (("random_keys", rand), ("sinks", 0), ("window", window))


def mean_keys(method: str, options: tuple[tuple[str, object], ...], seq_len: int) -> float:
    """Mean attended keys per query of a layer method with these options, at length seq_len."""
    n, o = seq_len, dict(options)
    if method == "full":
        return (n + 1) / 2
    if method == "sliding_window":
        return float(attended_keys(n, o["window"], method="sliding_window").float().mean())
    if method == "stochastic":
        return _sa_keys(n, o["window"], o.get("layout", "band"))
    if method == "stochastic_local":
        return _sa_keys(n, o["window"], local=o["local"])
    if method == "gated":
        return _sa_keys(n, o["window"], local=o["local_window"])
    if method == "moba":
        return float(moba_attended_keys(n, o["block_size"], o["top_k"]).float().mean())
    if method == "bigbird":
        return _bigbird_keys(n, o["window"], o["random_keys"], o["sinks"])
    raise ValueError(f"unknown layer method {method!r}")
