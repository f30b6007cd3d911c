"""``sattn coverage`` and ``sattn graph``: run the analysis, write PNG plots, markdown and JSON."""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import time
from pathlib import Path

import numpy as np

from ..cli_args import (
    UsageError,
    add_no_progress,
    add_out,
    add_seed,
    add_threads,
    add_window,
    check_memory,
    ensure_folder,
    int_at_least,
    length_list,
    method_list,
    nonneg_int,
    nonneg_int_list,
    optional_list,
    positive_int,
    positive_int_list,
    set_threads,
    zero_or_length,
)
from . import experiments, plots
from .families import PATTERNS, RENAMED, PatternSpec

DEFAULT_PATTERNS = ("sliding_window", "stochastic", "stochastic_block", "gated", "moba", "dilated")
THREADS_HELP = ("torch threads (default 1: the pattern ops are small, and on a busy CPU extra "
                "threads mostly wait on each other)")


def _add_run_options(parser: argparse.ArgumentParser, name: str) -> None:
    """--out runs/NAME (NAME.md and NAME.json beside the plots), --threads, --no-progress."""
    add_out(parser, Path(f"runs/{name}"), f"folder for the plots, {name}.md and {name}.json",
            type=Path)
    add_threads(parser, type=positive_int, help=THREADS_HELP)
    add_no_progress(parser)


def add_parser(subparsers) -> argparse.ArgumentParser:
    cov = subparsers.add_parser(
        "coverage", help="exact receptive fields through depth (plots, markdown, JSON)",
        description="Exact receptive-field coverage of the library's attention patterns: "
                    "coverage of the last token vs depth, layers to full coverage vs sequence "
                    "length, per-position coverage of causal patterns. List options are "
                    "comma-separated.")
    cov.add_argument("--seq-len", type=int_at_least(2), default=16384,
                     help="length for the depth curves")
    add_window(cov, 64, "attention window (>= 2)", type=int_at_least(2))
    cov.add_argument("--sinks", type=nonneg_int, default=0,
                     help="leading tokens every query also sees (all patterns but MoBA/dilated)")
    cov.add_argument("--patterns", type=method_list(PATTERNS, RENAMED, what="pattern"), default=list(DEFAULT_PATTERNS),
                     help=f"comma-separated, from {','.join(PATTERNS)}")
    cov.add_argument("--causal", choices=("causal", "non-causal", "both"), default="both",
                     help="which masks to measure")
    cov.add_argument("--seeds", type=nonneg_int_list, default=[0, 1, 2],
                     help="comma-separated permutation seeds (random patterns)")
    cov.add_argument("--max-layers", type=positive_int, default=300,
                     help="depth cap for random patterns (deterministic ones run to the end)")
    cov.add_argument("--sweep-seq-lens", type=optional_list(length_list), default=[1024, 4096, 16384],
                     help="comma-separated lengths for layers-to-full vs n ('': skip)")
    cov.add_argument("--sweep-patterns", type=method_list(PATTERNS, RENAMED, what="pattern"),
                     default=["sliding_window", "stochastic", "gated", "moba", "dilated"],
                     help="comma-separated patterns of the length sweep")
    cov.add_argument("--sweep-seeds", type=nonneg_int_list, default=[0, 1],
                     help="comma-separated permutation seeds of the length sweep")
    cov.add_argument("--sweep-max-layers", type=positive_int, default=150,
                     help="depth cap of the length sweep")
    cov.add_argument("--position-seq-len", type=zero_or_length, default=4096,
                     help="length for per-position coverage of all tokens (0: skip)")
    cov.add_argument("--position-depths", type=positive_int_list, default=[1, 2, 3, 4, 8, 16, 32],
                     help="comma-separated depths of the per-position coverage")
    _add_run_options(cov, "coverage")
    cov.set_defaults(func=run_coverage)

    graph = subparsers.add_parser(
        "graph", help="graph statistics of attention patterns (hops, clustering, spectral gap)",
        description="Small-world statistics of non-causal attention graphs and a comparison at "
                    "the fly connectome's scale. List options are comma-separated.")
    graph.add_argument("--seq-len", type=int_at_least(2), default=512, help="sequence length")
    add_window(graph, 16, "attention window (>= 2)", type=int_at_least(2))
    graph.add_argument("--patterns", type=method_list(PATTERNS, RENAMED, what="pattern"),
                       default=["sliding_window", "stochastic", "gated", "moba", "dilated"],
                       help=f"comma-separated, from {','.join(PATTERNS)}")
    graph.add_argument("--depths", type=positive_int_list, default=[1, 2, 4],
                       help="comma-separated numbers of layers whose union graph is measured")
    graph.add_argument("--gap-depth", type=nonneg_int, default=6,
                       help="spectral gap of products of up to this many layers (0: skip)")
    graph.add_argument("--small-world-seq-len", type=zero_or_length, default=128,
                       help="length of the small-world coefficients (0: skip)")
    graph.add_argument("--small-world-window", type=int_at_least(2), default=4,
                       help="window of the small-world coefficients")
    graph.add_argument("--connectome-nodes", type=zero_or_length, default=130_000,
                       help="nodes of the connectome-scale comparison (0: skip)")
    graph.add_argument("--connectome-degree", type=float, default=26.0,
                       help="mean degree of the random graph at connectome scale")
    graph.add_argument("--connectome-window", type=int_at_least(2), default=14,
                       help="window of each SA+SWA branch (single branches get twice this)")
    graph.add_argument("--connectome-sources", type=positive_int, default=64,
                       help="breadth-first-search sources for the hop counts")
    add_seed(graph, "permutation seed")
    _add_run_options(graph, "graph")
    graph.set_defaults(func=run_graph)
    return cov


def _check_edges(seq_len: int, window: int, option: str) -> None:
    """A layer's (query, key) pairs as int64 arrays plus their sparse copies: ~64 bytes each."""
    check_memory(64 * seq_len * window, f"{option} {seq_len} with window {window}",
                 f"use a shorter {option.split(' ')[0]} or a smaller window")


def _modes(choice: str) -> list[bool]:
    return {"causal": [True], "non-causal": [False], "both": [True, False]}[choice]


def _header(command: str) -> str:
    return (f"Generated by `{command}` on {platform.node() or 'this machine'} "
            f"({platform.processor() or platform.machine()}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "inf"
        return f"{x:.4g}"
    return str(x)


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(data), separators=(",", ":")))  # compact: curves are long


def _layers_text(summary: dict) -> str:
    if summary["complete"] == 0:
        return f"> {summary['cap']} (0/{summary['runs']} full)"
    text = f"{summary['mean']:.4g}"
    if summary["runs"] > 1:
        text += f" ± {summary['std']:.2g} [{summary['min']}-{summary['max']}]"
    if summary["complete"] < summary["runs"]:
        text += f" ({summary['complete']}/{summary['runs']} full by {summary['cap']})"
    return text


def run_coverage(args: argparse.Namespace) -> int:
    short = [n for n in (args.seq_len, *args.sweep_seq_lens) if n <= args.window]
    if short:
        raise UsageError(f"--window {args.window} must be shorter than every sequence length "
                         f"(got lengths {short}): one layer already sees the whole sequence")
    longest = max([args.seq_len, *args.sweep_seq_lens])
    _check_edges(longest, args.window, "--seq-len / --sweep-seq-lens")
    if args.position_seq_len:  # packed bitsets of all tokens' receptive fields: n^2 / 8 bytes
        n = args.position_seq_len
        check_memory(2 * n * (-(-n // 64) * 8), f"--position-seq-len {n}",
                     "use a shorter --position-seq-len (or 0 to skip)")
    set_threads(args.threads)
    out: Path = ensure_folder(args.out, "--out")
    modes = _modes(args.causal)
    specs = [PatternSpec(p, args.window, causal=c, sinks=args.sinks) for c in modes
             for p in args.patterns]
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v
                             for k, v in vars(args).items() if k != "func"}}
    md = ["# Receptive-field coverage\n", _header(_command("coverage", args))]

    curves = experiments.coverage_curves(specs, args.seq_len, args.seeds, args.max_layers)
    result["curves"] = curves
    plots.coverage_curves(curves, out / "coverage_curves.png")
    cap = args.max_layers
    depth_columns = sorted({d for d in (1, 2, 3, 4, 8, 64, 200, cap) if d <= cap})
    table = []
    for r in curves:
        s = experiments.summarize_layers(r["layers_to_full"], r["max_layers"])
        at = {f"L={d}": sum(c[d] for c in r["sizes"]) / len(r["sizes"]) / r["full"]
              for d in depth_columns}
        table.append({"pattern": r["pattern"], "causal": r["causal"],
                      "layers to full": _layers_text(s), **at})
    md.append(f"\n## Last token, n={args.seq_len}, w={args.window} "
              f"(coverage fraction at depth L; mean over seeds)\n\n")
    md.append(_table(table, ["pattern", "causal", "layers to full"]
                     + [f"L={d}" for d in depth_columns]))
    theory_rows = [experiments.theory_row(args.window, n)
                   for n in sorted({args.seq_len, *args.sweep_seq_lens})]
    result["theory"] = theory_rows
    md.append("\n## Theory (last token)\n\n")
    md.append(_table(theory_rows, list(theory_rows[0])))

    if args.sweep_seq_lens:
        sweep_specs = [PatternSpec(p, args.window, causal=c, sinks=args.sinks) for c in modes
                       for p in args.sweep_patterns]
        sweep = experiments.full_coverage_vs_length(sweep_specs, args.sweep_seq_lens,
                                                    args.sweep_seeds, args.sweep_max_layers)
        result["sweep"] = sweep
        plots.layers_vs_length(sweep, out / "layers_vs_length.png")
        rows = {}
        for r in sweep:
            key = (r["pattern"], r["causal"])
            rows.setdefault(key, {"pattern": r["pattern"], "causal": r["causal"]})
            summary = experiments.summarize_layers(r["layers_to_full"], r["max_layers"])
            rows[key][f"n={r['seq_len']}"] = _layers_text(summary)
        md.append(f"\n## Layers until the last token sees all n (w={args.window})\n\n")
        md.append(_table(list(rows.values()), ["pattern", "causal"]
                         + [f"n={n}" for n in args.sweep_seq_lens]))

    if args.position_seq_len:
        pos_specs = [PatternSpec(p, args.window, causal=True) for p in ("stochastic", "gated", "sliding_window")]
        per_pos = experiments.per_position_coverage(pos_specs, args.position_seq_len,
                                                    [0, *args.position_depths])
        plots.per_position(per_pos, out / "per_position.png")
        rows = []
        for r in per_pos:
            for d in args.position_depths:
                cov = r["coverage"][str(d)]
                n = len(cov)
                edge = max(1, n // 100)  # (at least one token on short sequences)
                rows.append({"pattern": r["pattern"], "L": d, "mean": sum(cov) / n,
                             "first 1%": sum(cov[:edge]) / edge,
                             "last 1%": sum(cov[-edge:]) / edge,
                             "tokens full": sum(c >= 1.0 for c in cov) / n})
        result["per_position"] = [_binned(r) for r in per_pos]
        md.append(f"\n## Causal per-position coverage, all tokens, n={args.position_seq_len}, "
                  f"w={args.window} (fraction of allowed sources)\n\n")
        md.append(_table(rows, ["pattern", "L", "mean", "first 1%", "last 1%", "tokens full"]))

    (out / "coverage.md").write_text("".join(md))
    _write_json(out / "coverage.json", result)
    print("".join(md))
    print(f"wrote {out}/coverage.md, coverage.json and PNG figures")
    return 0


def _binned(row: dict, bins: int = 128) -> dict:
    """Per-position lists averaged over ``bins`` equal runs of positions (keeps JSON small)."""
    bins = min(bins, len(row["keys_one_layer"]))  # (short sequences: one position a bin)

    def mean_bins(values):
        return [round(float(b.mean()), 5) for b in np.array_split(np.asarray(values, float), bins)]

    return {**row, "bins": bins, "keys_one_layer": mean_bins(row["keys_one_layer"]),
            "coverage": {d: mean_bins(v) for d, v in row["coverage"].items()}}


def run_graph(args: argparse.Namespace) -> int:
    for option, n, window in (("--seq-len", args.seq_len, args.window),
                              ("--small-world-seq-len", args.small_world_seq_len,
                               args.small_world_window),
                              ("--connectome-nodes", args.connectome_nodes,
                               2 * args.connectome_window)):
        if n and n <= max(window, 3):
            raise UsageError(f"{option} {n} is too short for a window of {window}: use more "
                             "than the window and at least 4 (or 0 to skip, where allowed)")
    _check_edges(args.seq_len, args.window * max(args.depths), "--seq-len")
    if args.connectome_nodes:
        _check_edges(args.connectome_nodes, 2 * args.connectome_window, "--connectome-nodes")
    if args.connectome_nodes and not 0 < args.connectome_degree < args.connectome_nodes - 1:
        raise UsageError(f"--connectome-degree must lie between 0 and --connectome-nodes - 1 = "
                         f"{args.connectome_nodes - 1}, got {args.connectome_degree}")
    set_threads(args.threads)
    out: Path = ensure_folder(args.out, "--out")
    specs = [PatternSpec(p, args.window, causal=False) for p in args.patterns]
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v
                             for k, v in vars(args).items() if k != "func"}}
    md = ["# Attention graphs\n", _header(_command("graph", args))]

    table = experiments.graph_table(specs, args.seq_len, args.depths, args.seed)
    result["graphs"] = table
    md.append(f"\n## Union graph over L non-causal layers, n={args.seq_len}, w={args.window}\n\n")
    md.append(_table(table, ["pattern", "layers", "mean_degree", "mean_hops", "max_hops",
                             "reachable", "clustering", "spectral_gap_single",
                             "spectral_gap_product"]))
    if args.gap_depth:
        gaps = experiments.spectral_gap_vs_depth(specs, args.seq_len, args.gap_depth, args.seed)
        result["spectral_gaps"] = gaps
        plots.spectral_gaps(gaps, out / "spectral_gap.png")
    if args.small_world_seq_len:
        sw_specs = [PatternSpec(p, args.small_world_window, causal=False)
                    for p in ("sliding_window", "stochastic", "gated")]
        sw = experiments.small_world_table(sw_specs, args.small_world_seq_len, args.seed)
        result["small_world"] = sw
        md.append(f"\n## Small-world coefficients of one layer (networkx), "
                  f"n={args.small_world_seq_len}, w={args.small_world_window}\n\n")
        md.append(_table(sw, ["pattern", "mean_degree", "sigma", "omega", "error"]))
    if args.connectome_nodes:
        conn = experiments.connectome_table(args.connectome_nodes, args.connectome_degree,
                                            args.connectome_window, args.connectome_sources,
                                            2000, args.seed)
        result["connectome"] = conn
        md.append(f"\n## Connectome scale: one non-causal layer vs a random graph "
                  f"({args.connectome_sources} BFS sources, clustering on 2000 nodes)\n\n")
        md.append(_table(conn, ["graph", "seq_len", "mean_degree", "mean_hops", "max_hops",
                                "clustering"]))
    (out / "graph.md").write_text("".join(md))
    _write_json(out / "graph.json", result)
    print("".join(md))
    print(f"wrote {out}/graph.md, graph.json and PNG figures")
    return 0


def _command(name: str, args: argparse.Namespace) -> str:
    """The full command line that reproduces this run (every option spelled out)."""
    parts = [f"sattn {name}"]
    for key, value in vars(args).items():
        if key in ("func", "command"):
            continue
        if key == "no_progress":
            continue
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        parts.append(f"--{key.replace('_', '-')} {shlex.quote(text)}")
    return " ".join(parts)
