"""``sattn fna``: the Fractional Neural Attention text-classification experiment."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...cli_args import (
    add_no_progress,
    add_out,
    add_threads,
    add_window,
    ensure_folder,
    length_list,
    positive_int,
    set_threads,
)

DEFAULT_SPEED_LENGTHS = [512, 1024, 2048, 4096]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fna", help="FNA vs softmax: one-layer text classification and attention-graph analysis",
        description="Train one-layer one-head encoders (FNA alpha=1.2, alpha=2, softmax) on a"
                    " passage-source task; report accuracy, spectral gap, shortest paths, plots.")
    p.add_argument("--config", default="configs/fna/passages.yaml", help="YAML experiment config")
    add_out(p, "runs/fna", "folder for results.json and table.md")
    p.add_argument("--figures", default=None, help="folder for the PNG figures (default: --out)")
    add_threads(p, type=positive_int, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 steps, one size, one seed")
    p.add_argument("--speed", type=length_list, nargs="?", const=DEFAULT_SPEED_LENGTHS,
                   metavar="N,N,...",
                   help="instead: time full FNA vs FNA in SA windows (fwd+bwd) at these "
                        "comma-separated lengths (default 512,1024,2048,4096)")
    add_window(p, 128, "window for --speed")
    add_no_progress(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from .run import load_config, run

    set_threads(args.threads)
    ensure_folder(args.out, "--out")
    if args.speed is not None:
        return _speed(args)
    result = run(load_config(args.config), args.out, args.figures, quick=args.quick)
    print((Path(args.out) / "table.md").read_text())
    print(f"{result['seconds']:.0f} s; results in {args.out}/results.json")
    return 0


def _speed(args: argparse.Namespace) -> int:
    import json

    from ...cli_args import check_memory
    from .speed import speed_markdown, speed_table

    n = max(args.speed)  # full FNA keeps n x n weights per head for the backward pass
    check_memory(4 * 4 * n * n * 2, f"--speed {n} (full FNA)", "use shorter --speed lengths")
    rows = speed_table(args.speed, window=args.window)
    out = Path(args.out)
    (out / "speed.json").write_text(json.dumps(rows, indent=1))
    print(speed_markdown(rows))
    return 0
