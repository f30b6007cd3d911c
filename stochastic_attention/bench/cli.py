"""``sattn bench``: time and memory of full, sliding-window and stochastic attention; table,
JSON and plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..cli_args import (
    UsageError,
    add_device,
    add_no_progress,
    add_out,
    add_window,
    check_device,
    check_memory,
    choice_list,
    int_at_least,
    method_list,
    positive_int,
    positive_int_list,
    renamed_option,
    resolve_dtype,
)
from .run import METHODS, RENAMED, Cell, as_records, benchmark, machine_info

DEFAULT_SEQ_LENS = "1024,2048,4096,8192,16384,32768,65536"
MODES = ("fwd", "fwd+bwd")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="time and memory of full / sliding-window / stochastic attention",
                       description=__doc__)
    p.add_argument("--seq-lens", type=positive_int_list, default=DEFAULT_SEQ_LENS,
                   help="comma-separated sequence lengths")
    add_window(p, 256, "attention window (keys per query)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size")
    p.add_argument("--heads", type=positive_int, default=8, help="attention heads")
    p.add_argument("--head-dim", type=positive_int, default=64, help="features per head")
    p.add_argument("--methods", type=method_list(METHODS, RENAMED), default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: full,sliding_window,"
                        "stochastic,stochastic_block,stochastic_per_head,stochastic_local; on GPU "
                        "the flex variants too)")
    p.add_argument("--modes", type=choice_list(MODES), default="fwd,fwd+bwd",
                   help="comma-separated, from fwd,fwd+bwd")
    add_device(p)
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per cell (median kept)")
    p.add_argument("--full-max-len", type=int_at_least(0), default=16384,
                   help="skip full attention above this length")
    renamed_option(p, "--dense-max-len", "--full-max-len")
    add_out(p, "bench-results", "folder for bench.json, bench.md and bench.png")
    add_no_progress(p, "no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from ..progress import tqdm

    seq_lens = tuple(args.seq_lens)
    check_device(args.device)
    methods = tuple(args.methods) if args.methods else (
        ("full", "sliding_window", "stochastic", "stochastic_block", "stochastic_per_head",
         "stochastic_local")
        + (("sliding_window_flex", "stochastic_flex", "stochastic_block_flex")
           if args.device.startswith("cuda") else ()))
    dtype_name = resolve_dtype(args.device, args.dtype)
    dtype = getattr(torch, dtype_name)
    modes = tuple(args.modes)
    # q, k, v, the output and (fwd+bwd) their gradients, at the longest length, before any work
    itemsize = torch.empty((), dtype=dtype).element_size()
    copies = 8 if "fwd+bwd" in modes else 4
    check_memory(copies * args.batch * args.heads * max(seq_lens) * args.head_dim * itemsize,
                 f"--seq-lens {max(seq_lens)} (batch {args.batch}, {args.heads} heads of "
                 f"{args.head_dim})", "use shorter --seq-lens or fewer --heads", device=args.device)
    total = len(seq_lens) * len(modes) * len(methods) * args.repeats
    with tqdm(total=total, desc="bench", unit="run") as bar:
        cells = benchmark(methods=methods, seq_lens=seq_lens, window=args.window, batch=args.batch,
                          heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=args.device,
                          modes=modes, repeats=args.repeats, full_max_len=args.full_max_len,
                          progress=bar.update)
    failed = sorted({(c.method, c.skipped) for c in cells if c.skipped and c.median_s is None
                     and not c.skipped.startswith(("seq_len > full_max_len", "no FlexAttention"))})
    if failed and all(c.median_s is None for c in cells):
        raise UsageError("no method ran: " + "; ".join(f"{m}: {why}" for m, why in failed))
    config = {k: v for k, v in vars(args).items()
              if k != "func" and not k.startswith("renamed_")} | {"dtype": dtype_name,
                                                                   "methods": methods}
    info = machine_info(args.device)
    table = markdown_tables(cells, methods, seq_lens, modes)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"config": config, "machine": info,
                                                "cells": as_records(cells)}, indent=1))
    header = (f"Machine: {info['processor']}, {info['threads']} threads, torch {info['torch']},"
              f" device {info.get('gpu', info['device'])}, {info['date']}. B={args.batch}, H={args.heads},"
              f" D={args.head_dim}, window={args.window}, {dtype_name}, median of {args.repeats}.\n\n")
    (out / "bench.md").write_text(header + table)
    plot(cells, methods, modes, out / "bench.png", title=f"window {args.window}, H={args.heads}, "
         f"D={args.head_dim}, {dtype_name}, {info.get('gpu', info['device'])}")
    print(f"saved {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0


def _get(cells, method, n, mode) -> Cell | None:
    return next((c for c in cells if c.method == method and c.seq_len == n and c.mode == mode), None)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _ms(c: Cell | None) -> str:
    return f"{c.median_s * 1e3:.1f}" if c and c.median_s else "-"


def _ratio(a: Cell | None, b: Cell | None) -> str:
    return f"{a.median_s / b.median_s:.2f}" if a and b and a.median_s and b.median_s else "-"


def _gflops(c: Cell | None) -> str:
    return f"{c.gflops_per_s:.1f}" if c and c.gflops_per_s else "-"


def _megabytes(c: Cell | None) -> str:
    return f"{c.peak_mem_mb:.0f}" if c and c.peak_mem_mb is not None and c.median_s else "-"


def markdown_tables(cells: list[Cell], methods, seq_lens, modes) -> str:
    """Median times (ms), ratios against the sliding window, achieved GFLOP/s and peak memory."""
    pairs = (("stochastic", "sliding_window"), ("stochastic_block", "sliding_window"),
             ("stochastic_per_head", "sliding_window"), ("stochastic_local", "sliding_window"),
             ("full", "sliding_window"), ("full", "stochastic"),
             ("stochastic_flex", "sliding_window_flex"), ("full", "sliding_window_flex"))
    ratio_pairs = [(a, b) for a, b in pairs if a in methods and b in methods]
    lines = []
    for mode in modes:
        by = {(m, n): _get(cells, m, n, mode) for m in methods for n in seq_lens}
        lines.append(f"### {mode}: median time (ms) and ratios\n")
        lines += _table(["seq_len", *methods, *[f"{a}/{b}" for a, b in ratio_pairs]],
                        [[str(n), *(_ms(by[m, n]) for m in methods),
                          *(_ratio(by[a, n], by[b, n]) for a, b in ratio_pairs)] for n in seq_lens])
        lines.append("")
        lines.append(f"### {mode}: achieved GFLOP/s (useful FLOPs / time) and peak memory (MB)\n")
        lines += _table(["seq_len", *[f"{m} GFLOP/s" for m in methods], *[f"{m} MB" for m in methods]],
                        [[str(n), *(_gflops(by[m, n]) for m in methods),
                          *(_megabytes(by[m, n]) for m in methods)] for n in seq_lens])
        lines.append("")
    skipped = sorted({(c.method, c.skipped) for c in cells if c.skipped})
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{m} ({why})" for m, why in skipped))
    return "\n".join(lines) + "\n"


def plot(cells, methods, modes, path: Path, title: str) -> None:
    from ..viz import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5 * (len(modes) + 1), 4))
    for ax, mode in zip(axes, modes, strict=False):
        for m in methods:
            pts = [(c.seq_len, c.median_s * 1e3) for c in cells if c.method == m and c.mode == mode and c.median_s]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="median time (ms)", title=mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[-1]
    for m in methods:
        pts = [(c.seq_len, c.peak_mem_mb) for c in cells
               if c.method == m and c.mode == modes[-1] and c.median_s and c.peak_mem_mb]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=m)
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak memory (MB)",
           title=f"peak memory, {modes[-1]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)
