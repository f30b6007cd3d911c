"""The ``sattn`` command line. Each subcommand lives in its own module with ``add_parser``.

A subcommand module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``func=`` (a callable taking the parsed args) with ``set_defaults``; list it in COMMANDS.
Modules are imported lazily so ``sattn --help`` stays fast and optional extras stay optional.

Every subcommand speaks the same language (``cli_args``): list options are comma-separated,
``--out`` is a folder, ``--no-progress`` silences progress bars. A user error (a
:class:`~stochastic_attention.cli_args.UsageError`) ends with one line,
``sattn CMD: error: MESSAGE``, and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .cli_args import UsageError

COMMANDS = (
    "stochastic_attention.bench.cli",
    "stochastic_attention.bench.decode_cli",
    "stochastic_attention.bench.compile_cli",
    "stochastic_attention.viz",
    "stochastic_attention.analysis.cli",
    "stochastic_attention.experiments.fna.cli",
    "stochastic_attention.train.cli",
    "stochastic_attention.train.compare_cli",
    "stochastic_attention.eval.cli",
    "stochastic_attention.experiments.longrange.cli",
    "stochastic_attention.experiments.longrange.position_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sattn", description="stochastic-attention tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="the tool to run (sattn COMMAND --help for its options)")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .progress import disabled

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # name the subcommand whose options these are not
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with disabled(getattr(args, "no_progress", False)):
            return int(args.func(args) or 0)
    except UsageError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"sattn {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
