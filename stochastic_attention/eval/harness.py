"""Standard benchmarks (MMLU, HellaSwag, ARC, BoolQ, LAMBADA, ...) through lm-evaluation-harness.

The harness scores an in-memory model (``HFLM(pretrained=<model instance>)``), so whatever
attention method :func:`stochastic_attention.hf.patch` registered is the one evaluated. Its
built-in tasks download their data sets; offline, point ``include_path`` at a folder with a
task YAML whose ``dataset_path: json`` reads a local jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..hf import patch, unpatch
from ..progress import tqdm
from .methods import MethodSpec
from .sweep import grid

INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install "stochastic-attention[harness]"'


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return lm_eval, HFLM, TaskManager


def _task_list(tasks: str | list[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in names if t and t.strip()]
    if not names:
        raise ValueError("tasks must name at least one lm-eval task, e.g. 'hellaswag,arc_easy'")
    return names


def run_harness(model, tokenizer, tasks: str | list[str], *, limit: int | float | None = None,
                batch_size: int = 1, num_fewshot: int | None = None,
                include_path: str | Path | None = None, include_defaults: bool = True,
                task_manager=None, **kwargs: Any) -> dict:
    """Score ``model`` (as it is now, patched or not) on lm-eval ``tasks``.

    Returns lm-eval's result dict (``results[task][metric]``, ``configs``, ...). ``limit`` caps
    the documents per task; ``include_path`` adds a folder of task YAMLs; set
    ``include_defaults=False`` to skip indexing lm-eval's own task folder (faster, local tasks
    only); or pass a ready ``task_manager`` (indexing lm-eval's tasks takes seconds). Other
    keyword arguments go to ``lm_eval.simple_evaluate``.
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = _task_list(tasks)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = task_manager or TaskManager(
        include_path=str(include_path) if include_path else None,
        include_defaults=include_defaults)
    kwargs.setdefault("log_samples", False)  # per-document outputs only on request
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, **kwargs)
    if out is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return out


def write_choice_task(task, tokenizer, folder: str | Path, name: str | None = None) -> Path:
    """Write a multiple-choice :class:`~stochastic_attention.eval.tasks.Task` (``nextline``:
    token ids of a context and of 4 choices) as an lm-eval task folder (YAML + local jsonl), so
    the harness can score data that never leaves this machine. Returns the folder."""
    if not task.examples or "choices" not in task.examples[0]:
        raise ValueError(f"task {task.name!r} is not multiple choice (examples need 'choices')")
    name = name or f"sattn_{task.name}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with data.open("w") as f:
        for ex in task.examples:
            # choices were encoded with their leading space, which lm-eval adds back
            f.write(json.dumps(dict(
                question=tokenizer.decode(ex["context"].tolist()),
                choices=[tokenizer.decode(c.tolist()).lstrip() for c in ex["choices"]],
                label=ex["label"])) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def harness_sweep(model, tokenizer, specs: list[MethodSpec], windows: list[int],
                  seeds: list[int], tasks: str | list[str], **harness_kwargs: Any) -> list[dict]:
    """One record per (method, window, seed, task, metric), patching as ``sattn eval`` does."""
    _, _, TaskManager = _lm_eval()
    layers = model.config.num_hidden_layers
    include = harness_kwargs.pop("include_path", None)
    defaults = harness_kwargs.pop("include_defaults", True)
    if harness_kwargs.get("task_manager") is None:  # index the task folders once, not per row
        harness_kwargs["task_manager"] = TaskManager(
            include_path=str(include) if include else None, include_defaults=defaults)
    names = _task_list(tasks)
    records = []
    for spec, window, seed in tqdm(grid(specs, windows, seeds), desc="harness", unit="row"):
        patch(model, **spec.settings(window or 1 << 30, layers, seed))
        try:
            out = run_harness(model, tokenizer, tasks, **harness_kwargs)
        finally:
            unpatch(model)
        for task, metrics in out["results"].items():
            for key, value in metrics.items():
                metric, sep, filt = key.partition(",")  # metrics are "name,filter"
                if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue  # alias, sample_len, standard errors
                records.append(dict(label=spec.label, window=window, seed=seed, task=task,
                                    metric=metric, filter=filt, value=float(value),
                                    subtask=task not in names))
    return records


def harness_table(records: list[dict]) -> str:
    """Markdown table: one row per (method, window), one column per task/metric, seed mean.
    Subtasks of a group (e.g. MMLU's subjects) stay out of the table when the group is in it."""
    from statistics import fmean

    top = [r for r in records if not r.get("subtask")]
    records = top or records

    columns = sorted({(r["task"], r["metric"]) for r in records})
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault((r["label"], r["window"]), {}).setdefault(
            (r["task"], r["metric"]), []).append(r["value"])
    head = ["method", "window"] + [f"{t} {m}" for t, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, window), cells in rows.items():
        values = [f"{fmean(cells[c]):.4f}" if c in cells else "" for c in columns]
        lines.append("| " + " | ".join([label, str(window or "-")] + values) + " |")
    return "\n".join(lines)
