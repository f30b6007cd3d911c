"""Run every (method, window, seed) of a grid on every task; aggregate over seeds; time prefill."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from ..hf import patched
from ..models.sa_llama import cache_argument, output_cache
from ..progress import tqdm
from .methods import MethodSpec, mean_keys
from .tasks import SCORERS, Task


def grid(specs: list[MethodSpec], windows: list[int], seeds: list[int]) -> list[tuple]:
    """(spec, window, seed) rows: full attention once, deterministic methods once per window,
    stochastic ones once per seed."""
    rows = []
    for spec in specs:
        if spec.method == "full":
            rows.append((spec, None, 0))
            continue
        for window in windows:
            for seed in seeds if spec.method == "stochastic" else seeds[:1]:
                rows.append((spec, window, seed))
    return rows


def run_sweep(model, tokenizer, specs, windows, seeds, tasks: list[Task]) -> list[dict]:
    """One record per (row, task): label, method, window, seed, task, metric, value, keys."""
    records = []
    rows = grid(specs, windows, seeds)
    layers = model.config.num_hidden_layers
    with tqdm(total=len(rows) * len(tasks), desc="eval grid", unit="cell") as bar:
        for spec, window, seed in rows:
            w = window or 1 << 30
            with patched(model, **spec.settings(w, layers, seed)):
                for task in tasks:
                    bar.set_postfix_str(f"{spec.label} w={window} s={seed} {task.name}")
                    value = SCORERS[task.name](model, task, tokenizer)
                    keys = mean_keys(spec, w, task.length, model.config, seed)
                    records.append(dict(label=spec.label, method=spec.method, window=window,
                                        seed=seed, task=task.name, metric=task.metric,
                                        higher_is_better=task.higher_is_better,
                                        length=task.length, value=value, keys_per_query=keys))
                    bar.update()
    return records


def aggregate(records: list[dict]) -> list[dict]:
    """Mean and spread over seeds for each (label, window, task)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["label"], r["window"], r["task"])].append(r)
    out = []
    for (label, window, task), rs in groups.items():
        values = [r["value"] for r in rs]
        out.append(dict(label=label, window=window, task=task, metric=rs[0]["metric"],
                        length=rs[0]["length"], mean=statistics.fmean(values),
                        std=statistics.pstdev(values) if len(values) > 1 else 0.0,
                        seeds=len(values),
                        keys_per_query=statistics.fmean(r["keys_per_query"] for r in rs)))
    return out


def time_prefill(model, specs, window: int, lengths: list[int], repeats: int = 1) -> list[dict]:
    """Seconds per prefill forward (best of ``repeats``) for each method at each length,
    measured side by side with full attention (methods interleaved in every repeat, so a
    change in machine load hits all of them); reports the ratio to full."""
    layers = model.config.num_hidden_layers
    best: dict[tuple, float] = {}
    jobs = [(r, n, spec) for r in range(repeats) for n in lengths for spec in specs]
    for _, n, spec in tqdm(jobs, desc="prefill timing", unit="run"):
        ids = torch.randint(0, model.config.vocab_size, (1, n),
                            generator=torch.Generator().manual_seed(n))
        settings = spec.settings(window if spec.method != "full" else 1 << 30, layers)
        with patched(model, **settings), torch.no_grad():
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            elapsed = time.perf_counter() - start
        key = (spec.label, n)
        best[key] = min(best.get(key, float("inf")), elapsed)
    out = [dict(label=label, length=n, window=window, seconds=sec, repeats=repeats)
           for (label, n), sec in best.items()]
    full = {r["length"]: r["seconds"] for r in out if r["label"] == "full"}
    for r in out:
        r["ratio_to_full"] = r["seconds"] / full[r["length"]] if r["length"] in full else None
    return out


def decode_cost(model, ids: torch.Tensor, prompt_len: int, window: int, *, sinks: int = 4,
                local: int = 64) -> list[dict]:
    """Quality and time of decoding after an SA prefill: full vs stochastic decode steps.

    The first ``prompt_len`` tokens of ``ids`` are prefilled with SA (``window``, ``sinks``,
    ``local``); the rest are fed one token at a time with the KV cache, as in generation, and
    scored (perplexity of the continuation) and timed (seconds per step). Full attention for
    both phases is the reference row.
    """
    rows = []
    cont = ids[prompt_len:]
    settings = [("full attention", dict(method="full", window=1)),
                ("SA prefill + full decode", dict(method="stochastic", decode="full")),
                ("SA prefill + stochastic decode", dict(method="stochastic", decode="stochastic"))]
    for label, kw in tqdm(settings, desc="decode cost", unit="setting"):
        sa = kw["method"] == "stochastic"
        options = {"window": window, "sinks": sinks, "local": local} if sa else {}
        nll, seconds = 0.0, 0.0
        with patched(model, **options, **kw), torch.no_grad():
            out = model(ids[None, :prompt_len], use_cache=True, logits_to_keep=1)
            cache, logits = output_cache(out), out.logits[0, -1]
            for t in range(len(cont)):
                nll -= torch.log_softmax(logits.float(), -1)[cont[t]].item()
                start = time.perf_counter()
                out = model(cont[None, t:t + 1], **cache_argument(cache), use_cache=True)
                seconds += time.perf_counter() - start
                cache, logits = output_cache(out), out.logits[0, -1]
        rows.append(dict(label=label, prompt=prompt_len, steps=len(cont), window=window,
                         perplexity=float(torch.exp(torch.tensor(nll / len(cont)))),
                         seconds_per_step=seconds / len(cont)))
    return rows
