"""``sattn bench-compile``: SA-Llama training-step time, eager vs torch.compile; table, JSON, plot."""

from __future__ import annotations

import argparse
import contextlib

import torch

from ..cli_args import (
    UsageError,
    add_no_progress,
    add_out,
    ensure_folder,
    int_at_least,
    method_list,
    positive_int,
)
from .compile import METHODS, as_records, load_average, measure, plot, table
from .run import RENAMED, machine_info, save_results


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench-compile", help="training-step time, eager vs torch.compile",
                       description=__doc__ + " The defaults are the model and batch of "
                       "configs/pretrain/*.yaml, on the CPU.")
    p.add_argument("--methods", type=method_list(tuple(METHODS), RENAMED), default=",".join(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--hidden", type=positive_int, default=128, help="model width")
    p.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--window", type=positive_int, default=32,
                   help="attention window (stochastic_local: half SA window, half local)")
    p.add_argument("--steps", type=positive_int, default=10,
                   help="timed steps of each of eager and compiled (median kept)")
    p.add_argument("--warmup", type=int_at_least(0), default=2,
                   help="untimed steps of each after the compiling one")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--warm-cache", action="store_true",
                   help="let inductor reuse its on-disk cache (default: every method compiles "
                        "into an empty one, so the compile time is that of a first run)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's own)")
    add_out(p, "bench-compile-results", "folder for compile.json, compile.md and compile.png")
    add_no_progress(p, "no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from torch._inductor.utils import fresh_cache

    from ..progress import tqdm

    if args.backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UsageError(f"--backend {args.backend!r} is not a torch.compile backend; choose "
                         f"from {', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    if args.hidden % args.heads:
        raise UsageError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    out = ensure_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    cells = []
    with tqdm(total=len(args.methods) * args.steps, desc="bench-compile", unit="step") as bar:
        for method in args.methods:
            cache = contextlib.nullcontext() if args.warm_cache else fresh_cache()
            with cache:
                cells.append(measure(method, seq_len=args.seq_len, batch=args.batch,
                                     hidden=args.hidden, layers=args.layers, heads=args.heads,
                                     window=args.window, steps=args.steps, warmup=args.warmup,
                                     backend=args.backend, progress=bar.update))
    config = {k: v for k, v in vars(args).items() if k not in ("func", "no_progress")}
    info = machine_info("cpu") | {"load_average_before": load_before,
                                  "load_average_after": load_average()}
    text = table(cells)
    print(text)
    header = (f"Machine: {info['processor']}, {info['threads']} threads, torch {info['torch']}, "
              f"{info['date']}, load average {load_before} before, {info['load_average_after']} "
              f"after. SA-Llama {args.layers} x {args.hidden}, {args.heads} heads, window "
              f"{args.window}, batch {args.batch} x {args.seq_len} tokens, backend "
              f"{args.backend} ({'warm' if args.warm_cache else 'empty'} compile cache); "
              f"median of {args.steps} steps after {args.warmup} warm-up.\n\n")
    save_results(out, "compile", config=config, machine=info, records=as_records(cells),
                 markdown=header + text)
    plot(cells, out / "compile.png", title=f"torch.compile ({args.backend}) training step, "
         f"{info['threads']} threads, seq {args.seq_len}")
    print(f"saved {out / 'compile.json'}, {out / 'compile.md'}, {out / 'compile.png'}")
    return 0
