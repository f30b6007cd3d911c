"""Side-by-side timing of FNA: full (chunked) vs inside stochastic-attention windows.

Forward + backward of one call at growing lengths; every row is measured in the same process,
interleaved, so the ratios are comparable even on a busy machine (absolute times are not).
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F

from ...functional import random_permutation
from ...ops.fractional import fractional_attention
from ...progress import tqdm


def _fwd_bwd(call) -> None:
    call().sum().backward()


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed_table(lengths: list[int], window: int = 128, heads: int = 4, head_dim: int = 64,
                alpha: float = 1.2, repeats: int = 3) -> list[dict]:
    """Best-of-``repeats`` seconds for fwd+bwd: full softmax (SDPA), full FNA, FNA in
    stochastic-attention windows."""
    rows = []
    for n in tqdm(lengths, desc="fna speed"):
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g, requires_grad=True)
                   for _ in range(3))
        perm = random_permutation(1, heads, n, generator=g)

        calls = {
            "softmax_full": partial(F.scaled_dot_product_attention, q, k, v),
            "fractional_full": partial(fractional_attention, q, k, v, alpha),
            "fractional_stochastic": partial(fractional_attention, q, k, v, alpha, window=window,
                                             perm=perm),
        }
        times = {name: _time(partial(_fwd_bwd, call), repeats) for name, call in calls.items()}
        rows.append({"seq_len": n, "window": window, **times,
                     "full_over_stochastic": times["fractional_full"]
                     / times["fractional_stochastic"],
                     "stochastic_over_softmax_full": times["fractional_stochastic"]
                     / times["softmax_full"]})
    return rows


def speed_markdown(rows: list[dict]) -> str:
    lines = ["| n | window | full FNA / FNA+SA | FNA+SA / full softmax (SDPA) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | {r['window']} | {r['full_over_stochastic']:.2f} | "
                     f"{r['stochastic_over_softmax_full']:.2f} |")
    return "\n".join(lines) + "\n"
