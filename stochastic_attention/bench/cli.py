"""``sattn bench``: time and memory of full, sliding-window and stochastic attention; table,
JSON and plot."""

from __future__ import annotations

import argparse
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
    ensure_folder,
    int_at_least,
    method_list,
    positive_int,
    positive_int_list,
    renamed_option,
    resolve_dtype,
)
from .run import INPUTS, METHODS, RENAMED, Cell, as_records, benchmark, machine_info, save_results

DEFAULT_SEQ_LENS = "1024,2048,4096,8192,16384,32768,65536"
MODES = ("fwd", "fwd+bwd")
DEFAULT_METHODS = ("full", "sliding_window", "stochastic", "stochastic_block", "stochastic_per_head",
                   "stochastic_local", "stochastic_local_block", "sliding_window_flex")


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
                   help=f"comma-separated, from {','.join(METHODS)} (default: "
                        f"{','.join(DEFAULT_METHODS)}; sliding_window_flex is the compiled "
                        "FlexAttention peer (forward only on CPU); on GPU the other flex variants "
                        "too)")
    p.add_argument("--modes", type=choice_list(MODES), default="fwd,fwd+bwd",
                   help="comma-separated, from fwd,fwd+bwd")
    add_device(p)
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per cell (median kept)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (CPU only; on a shared machine it "
                        "leaves out waiting for a core, and is exact with OMP_NUM_THREADS=1)")
    p.add_argument("--full-max-len", type=int_at_least(0), default=16384,
                   help="skip full attention above this length")
    renamed_option(p, "--dense-max-len", "--full-max-len")
    p.add_argument("--inputs", choices=INPUTS, default="contiguous",
                   help="contiguous: q, k, v as [B, H, n, D] tensors; projected: as a model's "
                        "projections give them (views of [B, n, H, D]), each call ending with the "
                        "output as [B, n, H * D], as a model takes it to its output projection")
    p.add_argument("--sinks", type=int_at_least(0), default=0,
                   help="the windowed methods also see the first SINKS positions (as the "
                        "training-free configurations do); dense attention sees them anyway")
    add_out(p, "bench-results", "folder for bench.json, bench.md and bench.png")
    add_no_progress(p, "no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from ..progress import tqdm

    seq_lens = tuple(args.seq_lens)
    if args.clock == "cpu" and args.device != "cpu":
        raise UsageError("--clock cpu measures CPU time; use it with --device cpu")
    check_device(args.device)
    methods = tuple(args.methods) if args.methods else DEFAULT_METHODS + (
        ("stochastic_flex", "stochastic_block_flex") if args.device.startswith("cuda") else ())
    dtype_name = resolve_dtype(args.device, args.dtype)
    dtype = getattr(torch, dtype_name)
    modes = tuple(args.modes)
    # q, k, v, the output and (fwd+bwd) their gradients, at the longest length, before any work
    itemsize = torch.empty((), dtype=dtype).element_size()
    copies = 8 if "fwd+bwd" in modes else 4
    check_memory(copies * args.batch * args.heads * max(seq_lens) * args.head_dim * itemsize,
                 f"--seq-lens {max(seq_lens)} (batch {args.batch}, {args.heads} heads of "
                 f"{args.head_dim})", "use shorter --seq-lens or fewer --heads", device=args.device)
    out = ensure_folder(args.out)  # before the run: a file in the way fails at once
    total = len(seq_lens) * len(modes) * len(methods) * args.repeats
    with tqdm(total=total, desc="bench", unit="run") as bar:
        cells = benchmark(methods=methods, seq_lens=seq_lens, window=args.window, batch=args.batch,
                          heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=args.device,
                          modes=modes, repeats=args.repeats, full_max_len=args.full_max_len,
                          progress=bar.update, clock=args.clock, inputs=args.inputs,
                          sinks=args.sinks)
    failed = sorted({(c.method, c.skipped) for c in cells if c.skipped and c.median_s is None
                     and not c.skipped.startswith(("seq_len > full_max_len", "no FlexAttention"))})
    if failed and all(c.median_s is None for c in cells):
        raise UsageError("no method ran: " + "; ".join(f"{m}: {why}" for m, why in failed))
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"dtype": dtype_name, "methods": methods}
    info = machine_info(args.device)
    io_bytes = 4 * args.batch * args.heads * args.head_dim * itemsize  # q, k, v, out per token
    table = markdown_tables(cells, methods, seq_lens, modes, io_bytes_per_token=io_bytes)
    print(table)
    header = (f"Machine: {info['processor']}, {info['threads']} threads, torch {info['torch']},"
              f" device {info.get('gpu', info['device'])}, {info['date']}. B={args.batch}, H={args.heads},"
              f" D={args.head_dim}, window={args.window}, sinks={args.sinks}, {dtype_name},"
              f" {args.inputs} inputs,"
              f" median of {args.repeats} ({args.clock} clock).\n\n")
    save_results(out, "bench", config=config, machine=info, records=as_records(cells),
                 markdown=header + table)
    plot(cells, methods, modes, out / "bench.png", title=f"{args.inputs} inputs, window {args.window}, H={args.heads}, "
         f"D={args.head_dim}, {dtype_name}, {info.get('gpu', info['device'])}")
    print(f"saved {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0


def _get(cells, method, n, mode) -> Cell | None:
    return next((c for c in cells if c.method == method and c.seq_len == n and c.mode == mode), None)


RATIO_PAIRS = (("stochastic", "sliding_window"), ("stochastic_block", "sliding_window"),
               ("stochastic_per_head", "sliding_window"), ("stochastic_local", "sliding_window"),
               ("stochastic_local_block", "sliding_window"), ("sliding_window", "sliding_window_flex"),
               ("full", "sliding_window"), ("full", "stochastic"),
               ("stochastic_flex", "sliding_window_flex"), ("full", "sliding_window_flex"))


def markdown_tables(cells: list[Cell], methods, seq_lens, modes, io_bytes_per_token: int = 0) -> str:
    """Median times (ms) and ratios; against the FLOP bound; achieved GFLOP/s and peak memory.

    ``io_bytes_per_token``: bytes of q, k, v and the output per position, for the forward's
    memory ratio (the forward + backward's is against dense attention's peak).
    """
    ratio_pairs = [(a, b) for a, b in RATIO_PAIRS if a in methods and b in methods]
    bounded = [m for m in methods if m != "full"]
    lines = []
    for mode in modes:
        def ran(m, n, mode=mode):
            c = _get(cells, m, n, mode)
            return c if c is not None and c.median_s else None

        rows = []
        for n in seq_lens:
            times = [_fmt(c.median_s * 1e3 if (c := ran(m, n)) else None, ".1f") for m in methods]
            ratios = [_fmt(a.median_s / b.median_s if (a := ran(x, n)) and (b := ran(y, n)) else None,
                           ".2f") for x, y in ratio_pairs]
            rows.append([str(n), *times, *ratios])
        _table(lines, f"### {mode}: median time (ms) and ratios",
               ["seq_len", *methods, *[f"{a}/{b}" for a, b in ratio_pairs]], rows)

        rows = []
        for n in seq_lens:
            share = [_fmt(c.pairs_vs_full if (c := ran(m, n)) else None, ".4f") for m in bounded]
            vs_bound = [_fmt(c.median_s / c.bound_s if (c := ran(m, n)) and c.bound_s else None, ".2f")
                        for m in bounded]
            rows.append([str(n), *share, *vs_bound])
        _table(lines, f"### {mode}: against the FLOP bound (useful pairs at dense flash attention's "
                      "time per pair)",
               ["seq_len", *[f"{m} pairs/dense" for m in bounded],
                *[f"{m} time/bound" for m in bounded]], rows)

        rows = []
        for n in seq_lens:
            dense = ran("full", n)
            rate = [_fmt(c.gflops_per_s if (c := ran(m, n)) else None, ".1f") for m in methods]
            mb = [_fmt(c.peak_mem_mb if (c := ran(m, n)) else None, ".0f") for m in methods]
            if mode == "fwd":
                rel = [_fmt(c.peak_mem_mb * 2**20 / (io_bytes_per_token * n) if (c := ran(m, n))
                            and c.peak_mem_mb is not None and io_bytes_per_token else None, ".2f")
                       for m in methods]
            else:
                rel = [_fmt(c.peak_mem_mb / dense.peak_mem_mb if (c := ran(m, n)) and dense
                            and c.peak_mem_mb is not None and dense.peak_mem_mb else None, ".2f")
                       for m in methods]
            rows.append([str(n), *rate, *mb, *rel])
        rel_name = "MB / (q+k+v+out)" if mode == "fwd" else "MB / dense MB"
        _table(lines, f"### {mode}: achieved GFLOP/s (useful FLOPs / time) and peak memory (MB)",
               ["seq_len", *[f"{m} GFLOP/s" for m in methods], *[f"{m} MB" for m in methods],
                *[f"{m} {rel_name}" for m in methods]], rows)
    skipped = sorted({(c.method, c.skipped) for c in cells if c.skipped})
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{m} ({why})" for m, why in skipped))
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(lines: list[str], title: str, head: list[str], rows: list[list[str]]) -> None:
    lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")


def plot(cells, methods, modes, path: Path, title: str) -> None:
    from ..viz import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(modes) + 2, figsize=(5 * (len(modes) + 2), 4))
    for ax, mode in zip(axes, modes, strict=False):
        for m in methods:
            pts = [(c.seq_len, c.median_s * 1e3) for c in cells if c.method == m and c.mode == mode and c.median_s]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="median time (ms)", title=mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[len(modes)]
    for mode, style in zip(modes, ("-", "--"), strict=False):
        for i, m in enumerate(methods):
            pts = [(c.seq_len, c.median_s / c.bound_s) for c in cells
                   if c.method == m and c.mode == mode and c.median_s and c.bound_s and m != "full"]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{i}", label=f"{m} {mode}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="time / FLOP bound",
           title="against dense flash attention's time per useful pair")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small", ncol=2)
    else:  # the bound is dense attention's rate: without a "full" run there is none
        ax.text(0.5, 0.5, "no bound: run with method full", ha="center", transform=ax.transAxes)
    ax = axes[-1]
    for m in methods:
        pts = [(c.seq_len, c.peak_mem_mb) for c in cells
               if c.method == m and c.mode == modes[-1] and c.median_s and c.peak_mem_mb]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=m)
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak memory (MB)",
           title=f"peak memory, {modes[-1]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(title)
    save_figure(fig, path)
