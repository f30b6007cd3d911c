"""``sattn longrange``: train small models per attention method on long-range tasks; report.

    sattn longrange run --profile full --shard 0/2 --out runs/longrange   # resumable shard
    sattn longrange report runs/longrange --out runs/longrange-report      # merge shards
    sattn longrange cost --out runs/longrange-cost                         # step time side by side
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from ...cli_args import (
    UsageError,
    add_no_progress,
    add_out,
    add_threads,
    float_list,
    int_list,
    method_list,
    positive_int,
    positive_int_list,
    renamed_option,
    set_threads,
    str_list,
)


def _csv(parse):
    """A shared comma-separated list type (cli_args), as the tuple the profiles hold."""
    def as_tuple(text: str) -> tuple:
        return tuple(parse(text))

    as_tuple.__name__ = parse.__name__
    return as_tuple


def add_parser(sub) -> argparse.ArgumentParser:
    from .methods import METHODS, RENAMED
    from .sweep import PROFILES

    p = sub.add_parser("longrange", help="trained long-range benchmark (majority, MQAR)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lsub = p.add_subparsers(dest="longrange_command", required=True, metavar="ACTION",
                            help="run, report or cost (sattn longrange ACTION --help)")

    run = lsub.add_parser("run", help="run (or resume) one shard of a profile's grid")
    run.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                     help="grid to run: quick (~15 min), full (the documented grid), width, mqar, "
                          "tiny (seconds)")
    run.add_argument("--quick", dest="profile", action="store_const", const="quick",
                     help="the same as --profile quick")
    run.add_argument("--shard", default="0/1", help="i/k: run shard i of k (groups split by estimated cost)")
    add_out(run, "runs/longrange", "folder for the shard files (resumed if present)")
    run.add_argument("--tasks", type=_csv(str_list), default=None, help="comma-separated task names (default: all)")
    run.add_argument("--methods", type=_csv(method_list(METHODS, RENAMED)), default=None,
                     help=f"comma-separated subset of {','.join(METHODS)}")
    renamed_option(run, "--kinds", "--methods")
    run.add_argument("--depths", type=_csv(positive_int_list), default=None, help="comma-separated layer counts")
    run.add_argument("--widths", type=_csv(positive_int_list), default=None, help="comma-separated model widths")
    run.add_argument("--seeds", type=_csv(int_list), default=None, help="comma-separated seeds")
    run.add_argument("--lrs", type=_csv(float_list), default=None, help="comma-separated learning rates")
    run.add_argument("--steps", type=positive_int, default=None, help="training steps per cell")
    add_threads(run, default=None, type=positive_int, help="torch CPU threads (default: torch's)")
    add_no_progress(run)
    run.set_defaults(func=run_main)

    rep = lsub.add_parser("report", help="merge shard folders into one table, JSON and plot")
    rep.add_argument("dirs", nargs="+", help="shard folders (or shard files) to merge")
    add_out(rep, "runs/longrange-report", "folder for longrange.md/.json/.png")
    rep.add_argument("--budget", type=positive_int, default=None,
                     help="SWA window of the grid (default: from the profile)")
    rep.set_defaults(func=report_main)

    sight = lsub.add_parser("sight", help="MQAR: how often each method can read the answer directly")
    sight.add_argument("--seq-lens", type=_csv(positive_int_list), default=(128, 512), help="MQAR lengths")
    sight.add_argument("--pairs", type=_csv(positive_int_list), default=(8, 32), help="key-value pairs, one per length")
    sight.add_argument("--budgets", type=_csv(positive_int_list), default=(8, 16), help="keys per query")
    sight.add_argument("--layers", type=_csv(positive_int_list), default=(1, 2, 4), help="comma-separated depths")
    sight.add_argument("--examples", type=positive_int, default=256, help="MQAR examples per cell")
    sight.add_argument("--draws", type=positive_int, default=64, help="pattern draws per cell")
    add_out(sight, "runs/longrange-sight", "folder for sight.md and sight.json")
    sight.set_defaults(func=sight_main)

    cost = lsub.add_parser("cost", help="training step time of every method, side by side, medians")
    cost.add_argument("--profile", choices=sorted(PROFILES), default="full", help="model and task sizes")
    cost.add_argument("--depth", type=positive_int, default=4, help="layers")
    cost.add_argument("--methods", type=_csv(method_list(METHODS, RENAMED)), default=None,
                      help="comma-separated methods")
    renamed_option(cost, "--kinds", "--methods")
    cost.add_argument("--repeats", type=positive_int, default=7, help="timed steps per method (median kept)")
    add_threads(cost, default=None, type=positive_int, help="torch CPU threads")
    add_out(cost, "runs/longrange-cost", "folder for cost.json and cost.md")
    cost.set_defaults(func=cost_main)
    return p


def _profile(args):
    from .sweep import PROFILES, select_tasks, with_overrides

    profile = with_overrides(PROFILES[args.profile], methods=args.methods, depths=args.depths,
                             widths=args.widths, seeds=args.seeds, lrs=args.lrs, steps=args.steps)
    try:
        return select_tasks(profile, getattr(args, "tasks", None))
    except ValueError as err:  # unknown task names
        raise UsageError(str(err)) from None


def run_main(args: argparse.Namespace) -> int:
    from .sweep import parse_shard, run_shard

    set_threads(args.threads)
    profile = _profile(args)  # --methods is checked as it is parsed
    try:
        shard = parse_shard(args.shard)
    except ValueError as err:
        raise UsageError(str(err)) from None
    start = time.time()
    path = run_shard(profile, Path(args.out), shard, progress=not args.no_progress)
    print(f"{path}: shard {args.shard} of profile {profile.name} done in {time.time() - start:.0f} s")
    return 0


def report_main(args: argparse.Namespace) -> int:
    from .report import markdown, plot, summarise
    from .sweep import PROFILES, load_records

    missing = [d for d in args.dirs if not Path(d).exists()]
    if missing:
        raise UsageError(f"no such shard folder or file: {missing}")
    try:
        records = load_records([Path(d) for d in args.dirs])
    except ValueError as err:  # records written before the rename
        raise UsageError(str(err)) from None
    if not records:
        raise UsageError(f"no records in {args.dirs}")
    budget = args.budget
    if budget is None:
        budget = PROFILES[records[0]["profile"]].budget
    rows = summarise(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "longrange.json").write_text(json.dumps({"rows": rows, "cells": len(records)}, indent=1))
    text = markdown(rows, budget=budget)
    (out / "longrange.md").write_text(text + "\n")
    plot(rows, out / "longrange.png", budget=budget)
    print(text)
    print(f"\n{len(records)} cells; wrote {out}/longrange.md, .json, .png")
    return 0


def cost_main(args: argparse.Namespace) -> int:
    import torch

    from .cost import step_times

    set_threads(args.threads)
    profile = _profile(argparse.Namespace(profile=args.profile, methods=args.methods, depths=None,
                                          widths=None, seeds=None, lrs=None, steps=None))
    table = step_times(profile, depth=args.depth, repeats=args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    (out / "cost.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
    lines = ["| task | method | keys/q | step time vs sliding_window (median) |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['method']} | {r['keys_per_query']:.1f} | "
              f"{r['ratio_vs_sliding_window']:.2f} |" for r in table]
    text = "\n".join(lines)
    (out / "cost.md").write_text(text + "\n")
    print(text)
    return 0


def sight_main(args: argparse.Namespace) -> int:
    from .methods import method_options
    from .sight import mqar_sight
    from .train import TaskSpec

    if len(args.pairs) != len(args.seq_lens):
        raise UsageError("--pairs needs one value per --seq-lens value")
    methods = ("full", "sliding_window", "stochastic", "stochastic_block", "stochastic_local",
               "gated", "bigbird")
    rows = []
    for n, pairs in zip(args.seq_lens, args.pairs):
        task = TaskSpec("mqar", seq_len=n, pairs=pairs, vocab=max(4 * pairs, 64), random_filler=False)
        for budget in args.budgets:
            for method in methods:
                layer_method, options = method_options(method, budget, n)
                for layers in args.layers:
                    r = mqar_sight(task, layer_method, options, layers, examples=args.examples,
                                   draws=args.draws)
                    rows.append(dict(r, method=method, seq_len=n, pairs=pairs, budget=budget))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sight.json").write_text(json.dumps(rows, indent=1))
    lines = []
    for n, pairs in zip(args.seq_lens, args.pairs):
        for budget in args.budgets:
            lines += [f"MQAR, {n} tokens, {pairs} pairs, {budget} keys/query:", "",
                      "| method | " + " | ".join(f"L={d}" for d in args.layers) + " |",
                      "|---|" + "---|" * len(args.layers)]
            for method in methods:
                cells = [r for r in rows if r["method"] == method and r["seq_len"] == n
                         and r["budget"] == budget]
                lines.append(f"| {method} | " + " | ".join(f"{r['sight']:.3f}" for r in cells) + " |")
            lines.append("")
    text = "\n".join(lines)
    (out / "sight.md").write_text(text + "\n")
    print(text)
    return 0
