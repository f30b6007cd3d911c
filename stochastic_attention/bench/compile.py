"""Training-step time of SA-Llama, eager against ``torch.compile``, side by side in one process.

For each method two identical models (same seed, same weights, same optimiser) take the same
training step: forward, loss, backward, gradient clipping and an AdamW step, as ``sattn train``
runs it with ``train.compile`` off and on (the compiled copy wraps only the model, the
optimiser stays eager). The first compiled step traces and compiles forward and backward; its
time, less one ordinary compiled step, is reported as the compile time. After warm-up the eager
and compiled steps alternate (eager, compiled, eager, compiled, ...) so that a slow spell of a
shared machine hits both alike, and the median of each is kept: claims are the ratio of the two.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..models import SALlamaConfig, SALlamaForCausalLM

# Bench cell -> (the method of every layer, its options besides the window), in the labels of
# ``sattn bench``: ``stochastic_block`` is the stochastic method in the block layout.
METHODS = {
    "full": ("full", {}),
    "sliding_window": ("sliding_window", {}),
    "stochastic": ("stochastic", {"layout": "band"}),
    "stochastic_block": ("stochastic", {"layout": "block"}),
    "stochastic_local": ("stochastic_local", {}),
    "gated": ("gated", {}),
}


@dataclass
class CompileCell:
    method: str
    eager_ms: float
    compiled_ms: float
    speedup: float  # eager time / compiled time: above 1, compiling pays
    compile_s: float  # first compiled step less one ordinary compiled step
    graphs: int = 0  # graphs compiled for this method (1: forward and backward, no break)
    graph_breaks: int = 0
    eager_times_ms: list[float] = field(default_factory=list)
    compiled_times_ms: list[float] = field(default_factory=list)


def model_config(method: str, *, hidden: int, layers: int, heads: int, window: int,
                 vocab: int = 257) -> SALlamaConfig:
    """The SA-Llama of one bench cell; ``stochastic_local`` splits its budget, half SA, half
    local."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    layer_method, options = METHODS[method]
    options = dict(options)
    if layer_method == "stochastic_local":
        options.update(window=max(window // 2, 1), local=max(window // 2, 1))
    elif layer_method != "full":
        options["window"] = window
    return SALlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, eos_token_id=vocab - 1,
                         attention_methods=layer_method, attention_options=options)


def make_step(model: torch.nn.Module, module: torch.nn.Module, tokens: torch.Tensor,
              grad_clip: float = 1.0) -> Callable[[], float]:
    """One training step of ``model`` (``module`` itself or its compiled wrapper) on ``tokens``
    [batch, seq + 1]; the optimiser and the clipping act on ``module``'s parameters."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def step() -> float:
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _timed(step: Callable[[], float]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(method: str, *, seq_len: int, batch: int, hidden: int, layers: int, heads: int,
            window: int, steps: int, warmup: int, backend: str = "inductor", seed: int = 0,
            progress: Callable[[int], None] | None = None) -> CompileCell:
    """Median step times of one method, eager and compiled, and the compile time."""
    config = model_config(method, hidden=hidden, layers=layers, heads=heads, window=window)
    torch.manual_seed(seed)
    eager = SALlamaForCausalLM(config).train()
    twin = copy.deepcopy(eager)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1),
                           generator=torch.Generator().manual_seed(seed))
    eager_step = make_step(eager, eager, tokens)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    breaks_before = sum(counters["graph_break"].values())
    compiled_step = make_step(torch.compile(twin, backend=backend), twin, tokens)
    first = _timed(compiled_step)  # traces and compiles forward and backward
    for _ in range(warmup):
        eager_step()
        compiled_step()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        times["eager"].append(_timed(eager_step))
        times["compiled"].append(_timed(compiled_step))
        if progress:
            progress(1)
    eager_s, compiled_s = (statistics.median(times[k]) for k in ("eager", "compiled"))
    return CompileCell(method, eager_s * 1e3, compiled_s * 1e3, eager_s / compiled_s,
                       max(first - compiled_s, 0.0),
                       counters["stats"]["unique_graphs"] - graphs_before,
                       sum(counters["graph_break"].values()) - breaks_before,
                       [t * 1e3 for t in times["eager"]], [t * 1e3 for t in times["compiled"]])


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (how busy a shared machine was), where known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def table(cells: list[CompileCell]) -> str:
    lines = ["| method | eager step (ms) | compiled step (ms) | speed-up (eager / compiled) "
             "| compile time (s) | graphs | graph breaks |", "|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c.method} | {c.eager_ms:.0f} | {c.compiled_ms:.0f} | "
                     f"{c.speedup:.2f}x | {c.compile_s:.0f} | {c.graphs} | {c.graph_breaks} |")
    return "\n".join(lines) + "\n"


def as_records(cells: list[CompileCell]) -> list[dict]:
    return [asdict(c) for c in cells]


def plot(cells: list[CompileCell], path, title: str) -> None:
    from ..viz import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(1.3 * len(cells) + 2, 3.5))
    ax.bar([c.method for c in cells], [c.speedup for c in cells], color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set(ylabel="speed-up (eager / compiled step)", title=title)
    for i, c in enumerate(cells):
        ax.annotate(f"{c.speedup:.2f}x", (i, c.speedup), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    save_figure(fig, path)
