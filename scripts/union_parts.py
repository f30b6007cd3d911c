"""The SA + local union's parts timed alone against SWA, through ``ops/flashband.py`` (CPU,
inference): SWA at ``--window``, its local part (a sliding window of window / 2), the SA part at
the bench's matched window with and without the exclusion of the recent keys, the merged union,
and the public call. Median of ``--repeats``, ratios to SWA.

    python scripts/union_parts.py --seq-len 16384 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import stochastic_attention as sa
from stochastic_attention.bench.run import matched_union_window
from stochastic_attention.ops import flashband


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, w, local = args.seq_len, args.window, args.window // 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, generator=g) for _ in range(3))
    perm = sa.random_permutation(1, 1, n, generator=g)
    scale = 64 ** -0.5
    calls = {"sliding_window": lambda: flashband.attention(q, k, v, [flashband.WindowPart(w)], scale),
             f"local part (window {local})":
                 lambda: flashband.attention(q, k, v, [flashband.WindowPart(local)], scale)}
    for layout in ("band", "block"):
        sa_window = matched_union_window(n, w, layout)
        order = flashband._sort_groups(perm, sa_window) if layout == "block" else perm
        calls |= {
            f"SA {layout} {sa_window}, recent keys excluded": lambda o=order, W=sa_window, lay=layout:
                flashband.attention(q, k, v, [flashband.WindowPart(W, lay, True, o, local)], scale),
            f"SA {layout} {sa_window}": lambda o=order, W=sa_window, lay=layout:
                flashband.attention(q, k, v, [flashband.WindowPart(W, lay, True, o)], scale),
            f"union {layout}": lambda o=order, W=sa_window, lay=layout:
                flashband.attention(q, k, v, flashband.window_parts(o, W, lay, True, local), scale),
            f"union {layout}, public call": lambda W=sa_window, lay=layout:
                sa.stochastic_attention(q, k, v, W, perm=perm, local=local, layout=lay),
        }
    times = {name: [] for name in calls}
    with torch.no_grad():
        for i in range(args.repeats + 1):  # interleaved; the first round warms up
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if i:
                    times[name].append(time.perf_counter() - start)
    swa = statistics.median(times["sliding_window"])
    for name, t in times.items():
        print(f"{name:45s} {statistics.median(t) / swa:.2f}x SWA")


if __name__ == "__main__":
    main()
