"""``sattn bench-decode``: per-token decode time, full cache vs sparse; table, JSON and plot."""

from __future__ import annotations

import argparse

import torch

from ..cli_args import (
    UsageError,
    add_device,
    add_no_progress,
    add_out,
    add_window,
    check_device,
    check_memory,
    ensure_folder,
    int_at_least,
    positive_int,
    positive_int_list,
    resolve_dtype,
)
from .decode import as_records, benchmark_decode, decode_table, plot_decode
from .run import machine_info, save_results


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench-decode", help="per-token decode time: full cache vs sparse",
                       description=__doc__)
    p.add_argument("--contexts", type=positive_int_list, default="1024,2048,4096,8192,16384",
                   help="comma-separated context lengths (cached tokens)")
    add_window(p, 256, "random earlier keys per generated token (sparse decode)")
    p.add_argument("--sinks", type=int_at_least(0), default=4, help="sink tokens (sparse decode)")
    p.add_argument("--local", type=positive_int, default=64,
                   help="most recent tokens, the new one included (sparse decode)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size")
    p.add_argument("--heads", type=positive_int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=positive_int, default=8,
                   help="key/value heads (grouped-query attention; must divide --heads)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="features per head")
    p.add_argument("--steps", type=positive_int, default=15,
                   help="timed decode steps per cell (median kept)")
    add_device(p)
    add_out(p, "bench-decode-results", "folder for decode.json, decode.md and decode.png")
    add_no_progress(p, "no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from ..progress import tqdm

    check_device(args.device)
    if args.heads % args.kv_heads:
        raise UsageError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    contexts = tuple(args.contexts)
    dtype_name = resolve_dtype(args.device, args.dtype)
    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # the cache (k and v) and full decode's copy of it repeated over the query heads
    need = 2 * args.batch * (args.kv_heads + args.heads) * max(contexts) * args.head_dim * itemsize
    check_memory(need, f"--contexts {max(contexts)} (batch {args.batch}, {args.heads} heads of "
                 f"{args.head_dim})", "use shorter --contexts or fewer --heads", device=args.device)
    out = ensure_folder(args.out)
    with tqdm(total=len(contexts) * args.steps, desc="bench-decode", unit="step") as bar:
        cells = benchmark_decode(contexts=contexts, window=args.window, sinks=args.sinks,
                                 local=args.local, batch=args.batch, heads=args.heads,
                                 kv_heads=args.kv_heads, head_dim=args.head_dim,
                                 steps=args.steps, dtype=dtype, device=args.device,
                                 progress=bar.update)
    info = machine_info(args.device)
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"dtype": dtype_name}
    table = decode_table(cells)
    header = (f"Machine: {info['processor']}, {info['threads']} threads, torch {info['torch']}, "
              f"device {info.get('gpu', info['device'])}, {info['date']}. B={args.batch}, "
              f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, sparse = "
              f"{args.sinks} sinks + {args.local} local + {args.window} sampled keys, "
              f"{dtype_name}, median of {args.steps} steps.\n\n")
    print(header + table)
    save_results(out, "decode", config=config, machine=info, records=as_records(cells),
                 markdown=header + table)
    plot_decode(cells, out / "decode.png",
                title=f"one decode step, Hq={args.heads}/Hkv={args.kv_heads}, D={args.head_dim}, "
                      f"{dtype_name}")
    print(f"saved {out / 'decode.json'}, {out / 'decode.md'}, {out / 'decode.png'}")
    return 0
