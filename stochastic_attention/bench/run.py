"""Timing and memory of attention methods, measured side by side in one process.

Each (method, seq_len, mode) cell is timed ``repeats`` times after a warm-up, and the median is
kept. Cells of one seq_len run interleaved (method A, B, C, A, B, C, ...) so that a slow spell of
a shared machine hits every method alike; speed claims are ratios between methods of one run.
"""

from __future__ import annotations

import ctypes
import functools
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import stochastic_attention as sa

# stochastic*: one permutation per sample shared by the heads (the operators' default), band
# layout unless "_block"; stochastic_per_head: one per sample and head (each head then needs its
# own mask). stochastic_local / stochastic_local_block: the SA + local union at the same mean
# attended keys as SWA's window: the last window // 2 positions plus an SA window (band / block
# layout) sized by :func:`matched_union_window`. "_flex": FlexAttention under torch.compile (on
# CPU, inference).
METHODS = ("full", "sliding_window", "stochastic", "stochastic_block", "stochastic_per_head",
           "stochastic_local", "stochastic_local_block", "sliding_window_flex", "stochastic_flex",
           "stochastic_block_flex")
# The former labels, for the errors that name the new ones.
RENAMED = {"dense": "full", "swa": "sliding_window", "sa_band": "stochastic",
           "sa_block": "stochastic_block", "sa_band_per_head": "stochastic_per_head",
           "sa_local": "stochastic_local", "sa_local_block": "stochastic_local_block",
           "swa_flex": "sliding_window_flex", "sa_band_flex": "stochastic_flex",
           "sa_block_flex": "stochastic_block_flex"}


@dataclass
class Cell:
    method: str
    seq_len: int
    mode: str  # "fwd" or "fwd+bwd"
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    peak_mem_mb: float | None = None
    pairs: float | None = None  # visible (query, key) pairs: the useful work
    pairs_vs_full: float | None = None  # pairs / dense causal attention's pairs
    gflop: float | None = None
    gflops_per_s: float | None = None
    bound_s: float | None = None  # time at dense flash attention's rate per useful pair
    skipped: str | None = None


INPUTS = ("contiguous", "projected")


def _union_layout(method: str) -> str:
    return "block" if method.endswith("_block") else "band"


@functools.lru_cache(maxsize=64)
def matched_union_window(seq_len: int, window: int, layout: str = "band") -> int:
    """The union's SA window whose mean attended keys (with ``local = window // 2``) first reach
    SWA's at ``window``, counted by the operators' own rule on one seeded permutation (at
    16,384 tokens at most: the mean no longer moves with the length by then)."""
    n = min(seq_len, 16384)
    target = sa.attended_keys(n, window, method="sliding_window").float().mean().item()

    def mean_keys(w: int) -> float:
        return sa.attended_keys(n, w, local=window // 2, layout=layout,
                                generator=torch.Generator().manual_seed(0)).float().mean().item()

    lo, hi = 1, 2 * window + 2  # the SA part sees about half its window
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if mean_keys(mid) < target else (lo, mid)
    return lo


def visible_pairs(method: str, seq_len: int, window: int, batch: int, heads: int) -> float:
    """Visible (query, key) pairs of one causal call, by the operators' own rule."""
    n = seq_len
    if method == "full":
        pairs = n * (n + 1) / 2
    elif method.startswith("sliding_window"):
        w = min(window, n)
        pairs = w * (w + 1) / 2 + (n - w) * w
    else:  # SA: visible pairs of a sample permutation
        base = method.removesuffix("_flex")
        g = torch.Generator().manual_seed(0)
        if base.startswith("stochastic_local"):
            layout = _union_layout(base)
            pairs = sa.attended_keys(n, matched_union_window(n, window, layout), local=window // 2,
                                     layout=layout, generator=g).sum().item()
        else:
            layout = "block" if "block" in base else "band"
            pairs = sa.attended_keys(n, window, layout=layout, generator=g).sum().item()
    return float(batch * heads * pairs)


def attention_flops(method: str, seq_len: int, window: int, batch: int, heads: int, head_dim: int) -> float:
    """Useful FLOPs of one causal forward: 4 * D per visible (query, key) pair (QK^T and PV)."""
    return 4.0 * head_dim * visible_pairs(method, seq_len, window, batch, heads)


def method_fn(method: str, window: int, seq_len: int | None = None, sinks: int = 0) -> Callable:
    """fn(q, k, v, perm) for a method; the union's matched window is sized for ``seq_len`` here,
    outside the timed call. ``sinks``: every windowed method also sees the first ``sinks``
    positions (dense attention sees them anyway)."""
    backend = "flex" if method.endswith("_flex") else "blocked"
    base = method.removesuffix("_flex")
    if base == "full":
        return lambda q, k, v, perm: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    options = {"backend": backend, "sinks": sinks}
    if base == "sliding_window":
        return lambda q, k, v, perm: sa.sliding_window_attention(q, k, v, window, **options)
    if base.startswith("stochastic_local"):
        if seq_len is None:
            raise ValueError(f"method {method!r} needs seq_len (its window matches SWA's keys)")
        layout = _union_layout(base)
        sa_window = matched_union_window(seq_len, window, layout)
        return lambda q, k, v, perm: sa.stochastic_attention(
            q, k, v, sa_window, perm=perm[:, :1], local=window // 2, layout=layout, **options)
    layout = "block" if base.endswith("_block") else "band"
    if base.endswith("_per_head"):
        return lambda q, k, v, perm: sa.stochastic_attention(q, k, v, window, perm=perm, layout=layout,
                                                             **options)
    return lambda q, k, v, perm: sa.stochastic_attention(q, k, v, window, perm=perm[:, :1], layout=layout,
                                                         **options)


class PeakMemory:
    """Peak bytes allocated above the starting level while the block runs.

    CUDA: the allocator's own peak counter. CPU: glibc's mallinfo2 (heap + mmapped bytes),
    sampled every ~0.2 ms from a thread (PyTorch ops release the GIL), so very short peaks may
    be missed; where mallinfo2 is missing, None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = None
        self._mallinfo = _mallinfo2()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        elif self._mallinfo is not None:
            self._start = self._mallinfo()
            self._max = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._mallinfo())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        elif self._mallinfo is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._mallinfo()) - self._start


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    fn.restype = MallInfo2
    return lambda: (lambda m: m.uordblks + m.hblkhd)(fn())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_call(fn: Callable, device: torch.device, clock: str = "wall") -> float:
    """Seconds one call takes: wall time, or this process's CPU time (``clock="cpu"``, CPU only:
    on a shared machine it leaves out the time spent waiting for a core; with one thread it is
    the work itself, with more it also counts threads spinning at their barriers)."""
    tick = CLOCKS[clock]
    _sync(device)
    start = tick()
    fn()
    _sync(device)
    return tick() - start


def benchmark(
    *,
    methods: tuple[str, ...],
    seq_lens: tuple[int, ...],
    window: int = 256,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    modes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    repeats: int = 5,
    full_max_len: int = 16384,
    progress=None,
    clock: str = "wall",
    inputs: str = "contiguous",
    sinks: int = 0,
) -> list[Cell]:
    """Time every (method, seq_len, mode); returns one :class:`Cell` each.

    ``inputs``: "contiguous" q, k, v [B, H, n, D]; or "projected", as a model's projections give
    them (transposed views of [B, n, H, D] tensors), the timed call ending as a model's does
    before its output projection (the output as [B, n, H * D]). ``sinks``: the windowed methods
    also see the first ``sinks`` positions (pairs and FLOPs count the window alone)."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    dev = torch.device(device)
    cells = []
    for n in seq_lens:
        g = torch.Generator().manual_seed(n)
        shape = (batch, heads, n, head_dim) if inputs == "contiguous" else (batch, n, heads, head_dim)
        q, k, v = (torch.randn(shape, generator=g).to(dev, dtype) for _ in range(3))
        perm = sa.random_permutation(batch, heads, n, generator=g, device=dev)
        for mode in modes:
            active = []
            for m in methods:
                cell = Cell(m, n, mode)
                cells.append(cell)
                if m == "full" and n > full_max_len:
                    cell.skipped = f"seq_len > full_max_len={full_max_len}"
                elif m.endswith("_flex") and (mode != "fwd" and dev.type == "cpu"):
                    cell.skipped = "no FlexAttention backward on CPU"
                else:
                    active.append((cell, _runner(m, window, q, k, v, perm, mode, inputs, sinks)))
            for cell, run in active:  # warm-up (and compilation for flex), with the memory peak
                try:
                    with PeakMemory(dev) as mem:
                        run()
                except Exception as exc:  # noqa: BLE001 - a method that cannot run is reported, not fatal
                    cell.skipped = f"{type(exc).__name__}: {exc}"[:200]
                    continue
                cell.peak_mem_mb = None if mem.peak is None else mem.peak / 2**20
            active = [(c, r) for c, r in active if c.skipped is None]
            for _ in range(repeats):
                for cell, run in active:
                    cell.times_s.append(time_call(run, dev, clock))
                    if progress is not None:
                        progress()
            for cell, _ in active:
                cell.median_s = statistics.median(cell.times_s)
                cell.pairs = visible_pairs(cell.method, n, window, batch, heads)
                cell.pairs_vs_full = cell.pairs / visible_pairs("full", n, window, batch, heads)
                fwd = 4.0 * head_dim * cell.pairs
                cell.gflop = fwd * (3.0 if mode == "fwd+bwd" else 1.0) / 1e9  # backward ~ 2x forward
                cell.gflops_per_s = cell.gflop / cell.median_s
    add_bounds(cells)
    return cells


def add_bounds(cells: list[Cell]) -> None:
    """Each cell's FLOP bound: its useful pairs at the time per pair of dense flash attention in
    the same mode (at the same length, or at the longest length dense ran; the kernels are
    judged against what PyTorch's fused kernel achieves on this machine, as NATTEN's profiler
    reports its kernels against the dense bound)."""
    for mode in {c.mode for c in cells}:
        dense = {c.seq_len: c.median_s / c.pairs for c in cells
                 if c.method == "full" and c.mode == mode and c.median_s}
        if not dense:
            continue
        for c in cells:
            if c.mode == mode and c.median_s and c.pairs:
                rate = dense.get(c.seq_len, dense[max(dense)])
                c.bound_s = rate * c.pairs


def _runner(method, window, q, k, v, perm, mode, inputs="contiguous", sinks=0):
    """A call of the method on q, k, v (as created for ``inputs``), forward or forward + backward."""
    if inputs == "projected":  # q, k, v are [B, n, H, D]; the method sees [B, H, n, D] views
        method_call = method_fn(method, window, q.shape[1], sinks)

        def fn(q, k, v, perm):
            out = method_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), perm)
            return out.transpose(1, 2).flatten(2)  # as a model hands it to its output projection
    else:
        fn = method_fn(method, window, q.shape[2], sinks)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v, perm)
        return run
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def run_bwd():
        out = fn(*leaves, perm)
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None
    return run_bwd


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def as_records(cells: list[Cell]) -> list[dict]:
    return [asdict(c) for c in cells]


def save_results(out: Path, name: str, *, config: dict, machine: dict, records: list[dict],
                 markdown: str) -> None:
    """``out/name.json`` (config, machine, cells) and ``out/name.md``: what every bench saves."""
    (out / f"{name}.json").write_text(json.dumps({"config": config, "machine": machine,
                                                  "cells": records}, indent=1))
    (out / f"{name}.md").write_text(markdown)
