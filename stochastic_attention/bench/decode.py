"""Per-token decode time of one attention layer over a KV cache: full vs sparse, side by side.

"full" is the layer's ``decode="full"`` path (:func:`~stochastic_attention.nn.cached_attention`
over the whole cache, the paper's protocol); "sparse" is ``decode="stochastic"``
(:func:`~stochastic_attention.ops.decode.sparse_decode`: the sinks, the last ``local`` tokens
and ``window`` sampled earlier tokens, gathered), the draw included. For every context the two
steps alternate (full, sparse, full, sparse, ...) so that a slow spell of a shared machine hits
both alike, and the median of each is kept.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..nn.attention import cached_attention
from ..ops.decode import sparse_decode
from .run import time_call

DECODE_METHODS = ("full", "sparse")


@dataclass
class DecodeCell:
    method: str
    context: int
    median_ms: float
    times_ms: list[float] = field(default_factory=list)


def decode_step(method: str, q, k, v, *, window: int, sinks: int, local: int) -> Callable:
    """A zero-argument call that decodes one token (q [B, Hq, 1, D]) over the cache k, v."""
    if method == "full":
        return lambda: cached_attention(q, k, v, k.shape[2], 0, None)
    if method == "sparse":
        return lambda: sparse_decode(q, k, v, None, window=window, sinks=sinks, local=local,
                                     seed=0, layer_idx=0)
    raise ValueError(f"method must be one of {DECODE_METHODS}, got {method!r}")


@torch.no_grad()
def benchmark_decode(*, contexts: tuple[int, ...], window: int, sinks: int, local: int,
                     batch: int, heads: int, kv_heads: int, head_dim: int, steps: int,
                     warmup: int = 2, dtype=torch.float32, device: str = "cpu",
                     progress: Callable[[int], None] | None = None) -> list[DecodeCell]:
    """Median time of one decode step for each (method, context)."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    cells = []
    for index, n in enumerate(contexts):
        q = torch.randn(batch, heads, 1, head_dim, generator=g).to(dev, dtype)
        k, v = (torch.randn(batch, kv_heads, n, head_dim, generator=g).to(dev, dtype)
                for _ in range(2))
        fns = {m: decode_step(m, q, k, v, window=window, sinks=sinks, local=local)
               for m in DECODE_METHODS}
        times: dict[str, list[float]] = {m: [] for m in DECODE_METHODS}
        # the first context also warms up the allocator and the kernels' first-call paths
        skip = warmup + (3 if index == 0 else 0)
        for i in range(skip + steps):
            for m, fn in fns.items():
                t = time_call(fn, dev)
                if i >= skip:
                    times[m].append(t * 1e3)
            if progress and i >= skip:
                progress(1)
        cells += [DecodeCell(m, n, statistics.median(ts), ts) for m, ts in times.items()]
        del q, k, v, fns
    return cells


def decode_table(cells: list[DecodeCell]) -> str:
    """Markdown: context, median ms of each method, and full / sparse."""
    by = {(c.method, c.context): c.median_ms for c in cells}
    contexts = sorted({c.context for c in cells})
    lines = ["| context | full decode (ms/token) | sparse decode (ms/token) | full / sparse |",
             "|---|---|---|---|"]
    for n in contexts:
        full, sparse = by[("full", n)], by[("sparse", n)]
        lines.append(f"| {n} | {full:.2f} | {sparse:.2f} | {full / sparse:.1f} |")
    return "\n".join(lines) + "\n"


def plot_decode(cells: list[DecodeCell], path, title: str) -> None:
    from ..viz import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 4))
    labels = {"full": "full decode (whole cache)", "sparse": "sparse decode (sinks+local+window)"}
    for m in DECODE_METHODS:
        pts = sorted((c.context, c.median_ms) for c in cells if c.method == m)
        ax.plot(*zip(*pts, strict=True), marker="o", label=labels[m])
    ax.set(xscale="log", yscale="log", xlabel="context (cached tokens)",
           ylabel="median time per token (ms)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def as_records(cells: list[DecodeCell]) -> list[dict]:
    return [asdict(c) for c in cells]
