"""A/B of the CPU flash path: this checkout's ``ops/flashband.py`` against the same file at
another git revision, both loaded in one process and timed interleaved (a slow spell of a shared
machine hits both alike), through ``sattn bench``'s own calls.

    python scripts/ab_flashband.py --against 1be3e84 --seq-len 16384 --repeats 7
    python scripts/ab_flashband.py --against d06ff57 --sinks 4 --inputs projected

Each version brings its own ``serves`` (which calls the path takes) and ``attention``.

Prints, per inputs layout, mode and method, the median times and the ratios (previous / this,
and each method / SWA under each version); ``--out`` saves them as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import stochastic_attention as sa
from stochastic_attention.bench import run as bench
from stochastic_attention.ops import flashband

ROOT = Path(__file__).resolve().parents[1]


def load_previous(rev: str):
    """``ops/flashband.py`` at ``rev`` as a module (its relative imports resolve in this package)."""
    source = subprocess.run(["git", "show", f"{rev}:stochastic_attention/ops/flashband.py"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "flashband_previous.py"
    path.write_text(source)
    name = "stochastic_attention.ops.flashband_previous"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="git revision of the previous flashband.py")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--methods", default="sliding_window,stochastic,stochastic_local")
    p.add_argument("--inputs", default="projected,contiguous")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--sinks", type=int, default=0, help="the methods also see the first SINKS positions")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = p.parse_args()

    previous = load_previous(args.against)
    versions = {"previous": (previous.serves, previous.attention),
                "this": (flashband.serves, flashband.attention)}
    methods = args.methods.split(",")
    n, g = args.seq_len, torch.Generator().manual_seed(0)
    perm = sa.random_permutation(1, 8, n, generator=g)
    rows = []
    for inputs in args.inputs.split(","):
        shape = (1, 8, n, 64) if inputs == "contiguous" else (1, n, 8, 64)
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        for mode in args.modes.split(","):
            runs = {m: bench._runner(m, args.window, q, k, v, perm, mode, inputs, args.sinks)
                    for m in methods}
            times = {(m, ver): [] for m in methods for ver in versions}
            for i in range(args.repeats + 1):  # the first round warms up
                for m in methods:
                    for ver, (serves, attention) in versions.items():
                        # what the dispatchers ask, and what every flashband entry point calls
                        flashband.serves, flashband.attention = serves, attention
                        start = time.perf_counter()
                        runs[m]()
                        if i:
                            times[(m, ver)].append(time.perf_counter() - start)
            flashband.serves, flashband.attention = versions["this"]
            med = {key: statistics.median(t) for key, t in times.items()}
            for m in methods:
                row = {"inputs": inputs, "mode": mode, "method": m,
                       **{f"{ver}_ms": med[(m, ver)] * 1e3 for ver in versions},
                       "previous/this": med[(m, "previous")] / med[(m, "this")],
                       **{f"{ver}_vs_swa": med[(m, ver)] / med[("sliding_window", ver)]
                          for ver in versions if ("sliding_window", ver) in med}}
                rows.append(row)
                print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else str(v)
                                 for k, v in row.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"against": args.against, "seq_len": n, "window": args.window,
                                        "sinks": args.sinks,
                                        "repeats": args.repeats, "threads": torch.get_num_threads(),
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
