"""``sattn position-loss``: mean next-token loss by position on held-out long documents.

Examples:
    sattn position-loss --model smollm2-135m --methods full,sliding_window:64+sinks=4
    sattn position-loss --checkpoints runs/full/final,runs/sa/final --seq-len 1024
"""

from __future__ import annotations

import argparse
import time

from ...cli_args import (
    UsageError,
    add_no_progress,
    add_out,
    add_seed,
    add_threads,
    add_window,
    run_meta,
    set_threads,
)
from .position import DEFAULT_SOURCES

DEFAULT_METHODS = "full,sliding_window+sinks=4,stochastic+sinks=4+local=0.75,moba+sinks=4"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "position-loss", help="mean next-token loss by position (log2 buckets) on long documents",
        description="Score held-out documents of the offline corpora with a released model "
                    "under several attention methods (training-free), or with trained SA-Llama "
                    "checkpoints; report mean loss per position bucket. Writes position.json, "
                    "position.md and position.png to --out.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", default=None,
                      help="built-in name (smollm2-135m), HF id or path; patched with --methods")
    what.add_argument("--checkpoints", default=None,
                      help="comma-separated SA-Llama folders written by `sattn train` (<run>/final)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="with --model: comma-separated specs name[:window][+opt=val...] as in "
                        "`sattn eval`, e.g. full,sliding_window:64+sinks=4,stochastic+sinks=4+local=0.75")
    add_window(p, 64, "window of methods without ':window'", type=int)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per document")
    p.add_argument("--docs", type=int, default=8, help="number of held-out documents")
    p.add_argument("--sources", default=None,
                   help="comma-separated corpora or paths (default: the checkpoints' training "
                        f"sources, else {','.join(DEFAULT_SOURCES)})")
    p.add_argument("--tokenizer", default=None,
                   help="for --checkpoints: 'byte', 'smollm2' or a HF name (default: the "
                        "training run's); --model uses its own tokenizer")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="held-out share of each source (default: the training run's, else 0.05)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the document split (default: the training run's, else 0)")
    add_seed(p, "document choice and SA permutations")
    add_threads(p, type=int)
    add_out(p, "runs/position")
    add_no_progress(p)
    p.set_defaults(func=run)
    return p


def _data_settings(args: argparse.Namespace, checkpoints: list[str]) -> dict:
    """Tokenizer, sources and split: the options given, else the checkpoints' training run."""
    from .position import training_data_config

    trained = [training_data_config(c) for c in checkpoints]
    known = [d for d in trained if d]
    for key in ("tokenizer", "val_fraction", "split_seed"):
        values = {str(d.get(key)) for d in known}
        if len(values) > 1 and getattr(args, key) is None:
            raise SystemExit(f"--checkpoints were trained with different {key}s {sorted(values)};"
                             f" pass --{key.replace('_', '-')} to choose one")
    first = known[0] if known else {}
    sources = args.sources.split(",") if args.sources else \
        [s for s in first.get("sources", DEFAULT_SOURCES) if isinstance(s, str)] or \
        list(DEFAULT_SOURCES)
    return dict(tokenizer=args.tokenizer or first.get("tokenizer", "byte"),
                sources=[s.strip() for s in sources if s.strip()],
                val_fraction=args.val_fraction if args.val_fraction is not None
                else first.get("val_fraction", 0.05),
                split_seed=args.split_seed if args.split_seed is not None
                else first.get("split_seed", 0))


def run(args: argparse.Namespace) -> int:
    from . import position_report
    from .position import compare_positions, heldout_documents, parse_position_method

    set_threads(args.threads)
    started = time.time()
    checkpoints = [c.strip() for c in (args.checkpoints or "").split(",") if c.strip()]
    model, methods = None, []
    if checkpoints:
        data = _data_settings(args, checkpoints)
        from ...data import load_tokenizer

        tokenizer = load_tokenizer(data["tokenizer"])
    else:
        from ...data.tokenizers import HFTokenizer
        from ...models import load_pretrained

        name = args.model or "smollm2-135m"
        methods = [parse_position_method(t, args.window) for t in args.methods.split(",")
                   if t.strip()]
        data = _data_settings(args, [])
        data["tokenizer"] = name
        model, hf_tokenizer = load_pretrained(name)
        tokenizer = HFTokenizer(hf_tokenizer, name)
    try:
        picked = heldout_documents(tokenizer, args.seq_len, args.docs, sources=data["sources"],
                                   val_fraction=data["val_fraction"],
                                   split_seed=data["split_seed"], seed=args.seed)
    except ValueError as err:  # too few long documents: the user's choice of --docs / --seq-len
        raise UsageError(str(err)) from None
    result = compare_positions([d["ids"] for d in picked], model=model, methods=methods,
                               checkpoints=checkpoints, seed=args.seed,
                               progress=not args.no_progress)
    result["documents"] = [dict(source=d["source"], index=d["index"]) for d in picked]
    result["data"] = data
    result["meta"] = run_meta(args, started,
                              model=args.model or ("smollm2-135m" if not checkpoints else None))
    paths = position_report.save(result, args.out)
    print(position_report.markdown_table(result))
    print(f"\nMean next-token loss (nats) per position bucket; {result['docs']} documents of "
          f"{result['seq_len']} tokens. Wrote {paths['json']}, {paths['markdown']}, "
          f"{paths['plot']}")
    return 0
