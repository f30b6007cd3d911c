"""``sattn pretrain-compare CONFIG... --seeds 0,1``: the paper-style pre-training comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import (
    add_no_progress,
    add_out,
    add_overrides,
    ensure_folder,
    int_list,
    nonneg_int,
    positive_int,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pretrain-compare", help="train and compare attention methods (paper-style, small scale)",
        description="Train every CONFIG with every seed, evaluate validation perplexity per "
                    "corpus, a long-range pass-key probe and zero-shot cloze accuracy, and write "
                    "a Markdown report with a loss-curve plot. Re-running skips finished runs and resumes others.")
    parser.add_argument("configs", nargs="+", type=Path, help="training configs (YAML)")
    parser.add_argument("--seeds", type=int_list, default=[0, 1],
                        help="comma-separated training seeds, each run for every config "
                             "(default 0,1)")
    add_out(parser, Path("runs/pretrain-comparison"), type=Path,
            help="folder for the runs (one sub-folder per config and seed) and results.json")
    parser.add_argument("--report", type=Path, default=None,
                        help="the Markdown report to write, results JSON and plot beside it "
                             "(default: OUT/results-pretraining.md)")
    add_overrides(parser, "override every config, e.g. --set train.steps=100")
    parser.add_argument("--eval-chunks", type=positive_int, default=32,
                        help="validation sequences per corpus for the final perplexity")
    parser.add_argument("--passkey-trials", type=positive_int, default=64,
                        help="pass-key examples per distance (near and far)")
    parser.add_argument("--cloze-examples", type=nonneg_int, default=50,
                        help="examples per zero-shot cloze task (lastword, nextline) built from "
                             "held-out documents; 0: skip")
    parser.add_argument("--cloze-context", type=positive_int, default=256,
                        help="context length of the cloze examples, in tokens")
    parser.add_argument("--cloze-seed", type=int, default=0,
                        help="seed choosing the cloze examples (the same for every model)")
    parser.add_argument("--header", default="", help="a note at the top of the report")
    parser.add_argument("--report-only", action="store_true",
                        help="report the finished runs, train nothing (scores missing from a run, "
                             "e.g. cloze accuracy, are computed from its final model)")
    add_no_progress(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..progress import disabled
    from .compare import run_comparison

    with disabled(args.no_progress):  # (again, now that transformers is imported)
        ensure_folder(args.out, "--out")
        report = args.report or args.out / "results-pretraining.md"
        run_comparison(args.configs, args.seeds, out_root=args.out, report=report,
                       overrides=args.overrides, eval_chunks=args.eval_chunks,
                       passkey_trials=args.passkey_trials, header=args.header,
                       progress=not args.no_progress, report_only=args.report_only,
                       cloze_examples=args.cloze_examples, cloze_context=args.cloze_context,
                       cloze_seed=args.cloze_seed)
    return 0
