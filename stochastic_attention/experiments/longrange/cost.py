"""Training step time of each method in the benchmark's models, measured side by side.

Methods are timed round-robin in one process (one step of each, repeated), so machine noise
hits all of them alike; the table reports each method's median step time relative to the
sliding window's.
"""

from __future__ import annotations

import statistics
import time

from .methods import mean_keys, method_options
from .sweep import Group, Profile
from .train import build_model, scored_loss


def step_times(profile: Profile, *, depth: int, repeats: int = 7, warmup: int = 2) -> list[dict]:
    rows = []
    for t, task in enumerate(profile.tasks):
        models = {}
        for method in profile.methods:
            cell = Group(t, method, depth, profile.widths[0]).cells(profile, profile.lrs[0], 0)
            models[method] = (build_model(cell), cell)
        batch = task.batch(profile.batch_size, seed=[3, 0])
        batches = batch.inputs, batch.labels
        times = {method: [] for method in models}
        for i in range(warmup + repeats):
            for method, (model, _) in models.items():
                start = time.perf_counter()
                loss = scored_loss(model(input_ids=batches[0]).logits, batches[1])
                loss.backward()
                model.zero_grad(set_to_none=True)
                if i >= warmup:
                    times[method].append(time.perf_counter() - start)
        sliding = (statistics.median(times["sliding_window"]) if "sliding_window" in times
                   else None)
        for method, (_model, cell) in models.items():
            med = statistics.median(times[method])
            options = method_options(method, profile.budget, task.seq_len)[1]
            rows.append(dict(task=task.name, method=method, median_seconds=med,
                             ratio_vs_sliding_window=med / sliding if sliding else float("nan"),
                             keys_per_query=mean_keys(cell.method, cell.attention, task.seq_len),
                             options=[list(o) for o in options]))
    return rows
