"""Standard benchmarks (MMLU, HellaSwag, ARC, BoolQ, LAMBADA, ...) through lm-evaluation-harness.

The harness scores an in-memory model (``HFLM(pretrained=<model instance>)``), so whatever
attention method :func:`stochastic_attention.hf.patch` registered is the one evaluated. Its
built-in tasks download their data sets; offline, point ``include_path`` at a folder with a
task YAML whose ``dataset_path: json`` reads a local jsonl.

A model trained by ``sattn train`` (its ``final/`` folder) is scored with its own attention:
:func:`load_trained` returns it with a Hugging Face tokenizer of the ids it was trained on (a
byte-level one for ``tokenizer: byte``), ready for :func:`run_harness`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..hf import patched
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


def _run_tokenizer_spec(folder: Path) -> str | None:
    """The ``data.tokenizer`` of the ``sattn train`` run whose ``final/`` is ``folder``."""
    run_config = folder.parent / "config.json"
    if not run_config.is_file():
        return None
    try:
        data = json.loads(run_config.read_text()).get("data", {})
    except (json.JSONDecodeError, AttributeError):
        return None
    return data.get("tokenizer", "byte") if isinstance(data, dict) else None


def trained_tokenizer(folder: str | Path, tokenizer: str | None = None):
    """A ``transformers`` tokenizer for the SA-Llama saved in ``folder``.

    ``tokenizer`` is a ``sattn train`` tokenizer spec ("byte", "smollm2", a HF name or path);
    by default the tokenizer saved in the folder, else the ``data.tokenizer`` of the run's
    ``config.json`` one folder up, else "byte" for a 257-token vocabulary.
    """
    from ..data.tokenizers import HFTokenizer, byte_level_hf_tokenizer, load_tokenizer

    folder = Path(folder)
    if tokenizer is None:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder)
        tokenizer = _run_tokenizer_spec(folder)
    if tokenizer is None:
        config = json.loads((folder / "config.json").read_text())
        if config.get("vocab_size") != 257:
            raise ValueError(f"{folder} holds no tokenizer and no run config.json one folder up; "
                             "pass tokenizer= (the data.tokenizer the model was trained with)")
        tokenizer = "byte"
    if tokenizer == "byte":
        return byte_level_hf_tokenizer()
    loaded = load_tokenizer(tokenizer)
    return loaded.tokenizer if isinstance(loaded, HFTokenizer) else loaded


def load_trained(folder: str | Path, tokenizer: str | None = None, **kwargs: Any):
    """(model, tokenizer) of an SA-Llama saved by ``sattn train`` (``runs/NAME/final``) or
    ``save_pretrained``, in eval mode, for :func:`run_harness`. ``tokenizer``: see
    :func:`trained_tokenizer`; other keyword arguments go to ``from_pretrained``
    (e.g. ``config=`` with other ``attention_options``, such as a ``perm_seed`` for the seeded
    evaluation permutations)."""
    from ..models import SALlamaForCausalLM

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a saved model folder (no config.json); give the "
                         "final/ folder of a sattn train run")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "sa_llama":
        raise ValueError(f"{folder} holds a {model_type!r} model, not SA-Llama; load released "
                         "models with stochastic_attention.models.load_pretrained")
    model = SALlamaForCausalLM.from_pretrained(folder, **kwargs).eval()
    tok = trained_tokenizer(folder, tokenizer)
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model only "
                         f"{model.config.vocab_size}; pass the tokenizer it was trained with")
    return model, tok


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
        with patched(model, **spec.settings(window or 1 << 30, layers, seed)):
            out = run_harness(model, tokenizer, tasks, **harness_kwargs)
        records += _records(out, names, label=spec.label, window=window, seed=seed)
    return records


def _records(out: dict, names: list[str], **row: Any) -> list[dict]:
    """One record per (task, metric) of an lm-eval result, with the fields in ``row``."""
    records = []
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")  # metrics are "name,filter"
            if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue  # alias, sample_len, standard errors
            records.append(dict(row, task=task, metric=metric, filter=filt, value=float(value),
                                subtask=task not in names))
    return records


def harness_trained(model, tokenizer, tasks: str | list[str], **harness_kwargs: Any) -> list[dict]:
    """Records as :func:`harness_sweep`'s for a trained SA-Llama scored with its own attention
    (one row, labelled with its layers' attention methods)."""
    methods = model.config.attention_methods
    label = "sa_llama:" + (methods[0] if len(set(methods)) == 1 else "/".join(methods))
    out = run_harness(model, tokenizer, tasks, **harness_kwargs)
    return _records(out, _task_list(tasks), label=label, window=None,
                    seed=model.config.attention_options.get("perm_seed", 0))


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
