"""The ``sattn`` command line. Each subcommand lives in its own module with ``add_parser``.

A subcommand module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``func=`` (a callable taking the parsed args) with ``set_defaults``; list it in COMMANDS.
Modules are imported lazily so ``sattn --help`` stays fast and optional extras stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "stochastic_attention.bench.cli",
    "stochastic_attention.viz",
    "stochastic_attention.analysis.cli",
    "stochastic_attention.experiments.fna.cli",
    "stochastic_attention.train.cli",
    "stochastic_attention.train.compare_cli",
    "stochastic_attention.eval.cli",
    "stochastic_attention.experiments.longrange.position_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sattn", description="stochastic-attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
