"""Figures: the PNG setup every report shares, and pictures of attention patterns drawn
from the operators' own visibility rule."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .cli_args import (
    UsageError,
    add_out,
    add_seed,
    add_window,
    check_memory,
    ensure_folder,
    int_at_least,
    nonneg_int,
)
from .ops.blocked import sort_groups
from .ops.patterns import dense_mask
from .ops.permute import random_permutation


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures go to files, so no display is needed
    (and none is opened on a machine that has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 120, tight: bool = True,
                **savefig) -> Path:
    """Write ``fig`` to ``path`` (folders created; ``tight``: lay it out first) and close it:
    pyplot keeps every open figure alive, so a sweep of plots would otherwise hold them all."""
    path = Path(path)
    try:
        if tight:
            fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, **savefig)
    finally:
        pyplot().close(fig)
    return path


def plot_patterns(path: str | Path, seq_len: int = 64, window: int = 8, sinks: int = 0, seed: int = 0) -> Path:
    """Masks of SWA, SA band and SA block (causal), in original and in permuted order."""
    plt = pyplot()
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
    return save_figure(fig, path, dpi=110)


MAX_SEQ_LEN = 4096  # a picture has a few thousand pixels a side; the masks are n x n


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("patterns", help="draw the SWA / SA band / SA block attention masks (PNG)",
                       description="Draw the causal SWA, SA band and SA block masks, in original "
                                   "and permuted order, into OUT/patterns.png.")
    p.add_argument("--seq-len", type=int_at_least(2), default=64,
                   help=f"sequence length (2 to {MAX_SEQ_LEN})")
    add_window(p, 8)
    p.add_argument("--sinks", type=nonneg_int, default=0,
                   help="leading tokens every query also sees")
    add_seed(p, "seed of the random permutation")
    add_out(p, ".", "folder for patterns.png (default: the current one)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.seq_len > MAX_SEQ_LEN:
        raise UsageError(f"--seq-len {args.seq_len} is too long to draw (n x n masks); "
                         f"use at most {MAX_SEQ_LEN}")
    # six n x n panels, converted to float images by matplotlib
    check_memory(6 * 16 * args.seq_len**2, f"--seq-len {args.seq_len}", "use a shorter --seq-len")
    print(plot_patterns(ensure_folder(args.out, "--out") / "patterns.png", args.seq_len, args.window, args.sinks,
                        args.seed))
    return 0
