"""``sattn train CONFIG.yaml``: pre-train an SA-Llama model (also under torchrun)."""

from __future__ import annotations

import argparse
import json

from ..cli_args import add_no_progress, add_overrides


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="pre-train a language model from a YAML config",
        description="Pre-train an SA-Llama model. Run under `torchrun --nproc_per_node=N` for "
                    "data-parallel training (DDP, or FSDP with train.distributed=fsdp). "
                    "A new run refuses to start in a folder that holds another run.")
    parser.add_argument("config", help="YAML file with model / data / train sections")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in train.out_dir from its latest checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the run already in train.out_dir (checkpoints, metrics, "
                            "final model) and start a new one")
    add_overrides(parser, "override a config value, e.g. --set train.steps=200 (repeatable)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for the training steps (the same as "
                             "--set train.compile=true)")
    add_no_progress(parser, "no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..progress import disabled
    from .config import load_config
    from .distributed import launched_rank
    from .loop import train

    with disabled(args.no_progress):  # (again, now that transformers is imported)
        overrides = args.overrides + (["train.compile=true"] if args.compile else [])
        summary = train(load_config(args.config, overrides), resume=args.resume,
                        overwrite=args.overwrite, progress=not args.no_progress)
    if launched_rank() == 0:  # under torchrun, one summary rather than one per process
        print(json.dumps(summary))
    return 0
