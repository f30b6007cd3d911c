"""``python -m stochastic_attention.train CONFIG.yaml [--resume]`` (e.g. under torchrun -m)."""

import argparse
import sys

from .cli import add_parser

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stochastic_attention.train")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *sys.argv[1:]])
    sys.exit(args.func(args))
