"""``sattn fna``: the Fractional Neural Attention text-classification experiment."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fna", help="FNA vs softmax: one-layer text classification and attention-graph analysis",
        description="Train one-layer one-head encoders (FNA alpha=1.2, alpha=2, softmax) on a"
                    " passage-source task; report accuracy, spectral gap, shortest paths, plots.")
    p.add_argument("--config", default="configs/fna/passages.yaml", help="YAML experiment config")
    p.add_argument("--out", default="runs/fna", help="folder for results.json and table.md")
    p.add_argument("--figures", default=None, help="folder for the PNG figures (default: --out)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 steps, one size, one seed")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    import torch

    from .run import load_config, run

    torch.set_num_threads(args.threads)
    result = run(load_config(args.config), args.out, args.figures, quick=args.quick)
    print((Path(args.out) / "table.md").read_text())
    print(f"{result['seconds']:.0f} s; results in {args.out}/results.json")
    return 0
