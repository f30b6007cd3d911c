"""Training step time of each kind in the benchmark's models, measured side by side.

Kinds are timed round-robin in one process (one step of each, repeated), so machine noise hits
all of them alike; the table reports each kind's median step time relative to SWA's.
"""

from __future__ import annotations

import statistics
import time

from .kinds import kind_options, mean_keys
from .sweep import Group, Profile
from .train import build_model, scored_loss


def step_times(profile: Profile, *, depth: int, repeats: int = 7, warmup: int = 2) -> list[dict]:
    rows = []
    for t, task in enumerate(profile.tasks):
        models = {}
        for kind in profile.kinds:
            cell = Group(t, kind, depth, profile.widths[0]).cells(profile, profile.lrs[0], 0)
            models[kind] = (build_model(cell), cell)
        batch = task.batch(profile.batch_size, seed=[3, 0])
        batches = batch.inputs, batch.labels
        times = {kind: [] for kind in models}
        for i in range(warmup + repeats):
            for kind, (model, _) in models.items():
                start = time.perf_counter()
                loss = scored_loss(model(input_ids=batches[0]).logits, batches[1])
                loss.backward()
                model.zero_grad(set_to_none=True)
                if i >= warmup:
                    times[kind].append(time.perf_counter() - start)
        swa = statistics.median(times["swa"]) if "swa" in times else None
        for kind, (_model, cell) in models.items():
            med = statistics.median(times[kind])
            rows.append(dict(task=task.name, kind=kind, median_seconds=med,
                             ratio_vs_swa=med / swa if swa else float("nan"),
                             keys_per_query=mean_keys(cell.kind, cell.attention, task.seq_len),
                             options=[list(o) for o in kind_options(kind, profile.budget, task.seq_len)[1]]))
    return rows
