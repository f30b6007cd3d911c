"""Pictures of attention patterns, drawn from the operators' own visibility rule."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .ops.blocked import sort_groups
from .ops.patterns import dense_mask
from .ops.permute import random_permutation


def plot_patterns(path: str | Path, seq_len: int = 64, window: int = 8, sinks: int = 0, seed: int = 0) -> Path:
    """Masks of SWA, SA band and SA block (causal), in original and in permuted order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    perm = random_permutation(1, 1, seq_len, generator=torch.Generator().manual_seed(seed))
    block_perm = sort_groups(perm, window)
    panels = [
        ("SWA", dense_mask(seq_len, window, sinks=sinks)[0, 0], None),
        ("SA band", dense_mask(seq_len, window, perm=perm, sinks=sinks)[0, 0], perm[0, 0]),
        ("SA block", dense_mask(seq_len, window, perm=block_perm, layout="block", sinks=sinks)[0, 0],
         block_perm[0, 0]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.5))
    for col, (name, mask, order) in enumerate(panels):
        keys = int(mask.sum())
        axes[0, col].imshow(mask, cmap="Greys", interpolation="nearest")
        axes[0, col].set_title(f"{name}: original order\n{keys} visible pairs")
        shown = mask if order is None else mask[order][:, order]
        axes[1, col].imshow(shown, cmap="Greys", interpolation="nearest")
        axes[1, col].set_title(f"{name}: permuted (slot) order")
        for ax in axes[:, col]:
            ax.set_xlabel("key")
            ax.set_ylabel("query")
    fig.suptitle(f"Causal attention patterns, n={seq_len}, window={window}, sinks={sinks}: "
                 "SA is a window in a random order, so each token reaches far-away tokens")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("patterns", help="draw the SWA / SA band / SA block attention masks (PNG)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--sinks", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/figures/patterns.png")
    p.set_defaults(func=lambda a: print(plot_patterns(a.out, a.seq_len, a.window, a.sinks, a.seed)))
    return p
