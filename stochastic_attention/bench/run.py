"""Timing and memory of attention methods, measured side by side in one process.

Each (method, seq_len, mode) cell is timed ``repeats`` times after a warm-up, and the median is
kept. Cells of one seq_len run interleaved (method A, B, C, A, B, C, ...) so that a slow spell of
a shared machine hits every method alike; speed claims are ratios between methods of one run.
"""

from __future__ import annotations

import ctypes
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import stochastic_attention as sa

# stochastic*: one permutation per sample shared by the heads (the operators' default), band
# layout unless "_block"; stochastic_per_head: one per sample and head (each head then needs its
# own mask). stochastic_local: the SA + local union at the same nominal budget, an SA window of
# window // 2 plus the last window // 2 positions (two passes merged by log-sum-exp).
# "_flex": the same on the FlexAttention backend.
METHODS = ("full", "sliding_window", "stochastic", "stochastic_block", "stochastic_per_head",
           "stochastic_local", "sliding_window_flex", "stochastic_flex", "stochastic_block_flex")
# The former labels, for the errors that name the new ones.
RENAMED = {"dense": "full", "swa": "sliding_window", "sa_band": "stochastic",
           "sa_block": "stochastic_block", "sa_band_per_head": "stochastic_per_head",
           "sa_local": "stochastic_local", "swa_flex": "sliding_window_flex",
           "sa_band_flex": "stochastic_flex", "sa_block_flex": "stochastic_block_flex"}


@dataclass
class Cell:
    method: str
    seq_len: int
    mode: str  # "fwd" or "fwd+bwd"
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    peak_mem_mb: float | None = None
    gflop: float | None = None
    gflops_per_s: float | None = None
    skipped: str | None = None


def attention_flops(method: str, seq_len: int, window: int, batch: int, heads: int, head_dim: int) -> float:
    """Useful FLOPs of one causal forward: 4 * D per visible (query, key) pair (QK^T and PV)."""
    n = seq_len
    if method == "full":
        pairs = n * (n + 1) / 2
    elif method.startswith("sliding_window"):
        w = min(window, n)
        pairs = w * (w + 1) / 2 + (n - w) * w
    else:  # SA: visible pairs of a sample permutation, by the operators' own rule
        layout = "block" if "block" in method else "band"
        w, local = ((max(1, window // 2), window // 2) if method == "stochastic_local"
                    else (window, 0))
        pairs = sa.attended_keys(n, w, layout=layout, local=local,
                                 generator=torch.Generator().manual_seed(0)).sum().item()
    return 4.0 * batch * heads * head_dim * pairs


def method_fn(method: str, window: int) -> Callable:
    backend = "flex" if method.endswith("_flex") else "blocked"
    base = method.removesuffix("_flex")
    if base == "full":
        return lambda q, k, v, perm: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if base == "sliding_window":
        return lambda q, k, v, perm: sa.sliding_window_attention(q, k, v, window, backend=backend)
    if base == "stochastic_local":
        half = max(1, window // 2)
        return lambda q, k, v, perm: sa.stochastic_attention(q, k, v, half, perm=perm[:, :1],
                                                             local=window // 2, backend=backend)
    layout = "block" if base == "stochastic_block" else "band"
    if base.endswith("_per_head"):
        return lambda q, k, v, perm: sa.stochastic_attention(q, k, v, window, perm=perm, layout=layout,
                                                             backend=backend)
    return lambda q, k, v, perm: sa.stochastic_attention(q, k, v, window, perm=perm[:, :1], layout=layout,
                                                         backend=backend)


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


def time_call(fn: Callable, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


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
) -> list[Cell]:
    """Time every (method, seq_len, mode); returns one :class:`Cell` each."""
    dev = torch.device(device)
    cells = []
    for n in seq_lens:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(dev, dtype) for _ in range(3))
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
                    active.append((cell, _runner(m, window, q, k, v, perm, mode)))
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
                    cell.times_s.append(time_call(run, dev))
                    if progress is not None:
                        progress()
            for cell, _ in active:
                cell.median_s = statistics.median(cell.times_s)
                fwd = attention_flops(cell.method, n, window, batch, heads, head_dim)
                cell.gflop = fwd * (3.0 if mode == "fwd+bwd" else 1.0) / 1e9  # backward ~ 2x forward
                cell.gflops_per_s = cell.gflop / cell.median_s
    return cells


def _runner(method, window, q, k, v, perm, mode):
    fn = method_fn(method, window)
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
