"""``sattn eval``: compare attention methods on a released model with tasks built from real text.

Example (the short default comparison, a few minutes on a laptop CPU):
    sattn eval --quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..cli_args import (
    UsageError,
    add_no_progress,
    add_out,
    add_threads,
    ensure_folder,
    float_list,
    int_at_least,
    int_list,
    length_list,
    nonneg_int,
    optional_list,
    positive_int,
    positive_int_list,
    run_meta,
    set_threads,
    str_list,
)

DEFAULT_METHODS = ("full,sliding_window,sliding_window+sinks=4,stochastic+sinks=4,"
                   "stochastic+sinks=4+local=0.5,moba,moba+sinks=4")
DEFAULT_TASKS = "perplexity,passkey,lastword,nextline"
QUICK = dict(methods="full,sliding_window+sinks=4,stochastic+sinks=4+local=0.5,moba+sinks=4",
             windows=[64, 128], seeds=[0], examples=12, context=256, ppl_docs=1,
             ppl_length=1024, passkey_lengths=[1024], passkey_depths=[0.5], passkey_per_cell=2)


def _decode_check(text: str) -> list[int]:
    values = positive_int_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected PROMPT,STEPS (two integers), got {text!r}")
    return values


_decode_check.__name__ = "PROMPT,STEPS"


def _fraction_or_count(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1), got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="training-free comparison of attention methods on a pretrained model",
        description="Patch a pretrained model with each method/window and score it on "
                    "perplexity, passkey retrieval, last-word and next-line tasks built from "
                    "real text. Prints a table; writes JSON, markdown and a PNG plot. "
                    "List options are comma-separated.")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name, HF id or path; an SA-Llama folder (sattn train's "
                        "final/) is scored with its own attention on --harness tasks")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated specs name[+opt=val...], e.g. stochastic+sinks=4+local=0.5")
    p.add_argument("--windows", type=positive_int_list, default=[32, 64, 128, 256],
                   help="comma-separated windows")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2],
                   help="comma-separated permutation seeds for stochastic methods")
    p.add_argument("--tasks", type=str_list, default=None,
                   help="comma-separated tasks, or 'none' (e.g. timing only); default: "
                        f"{DEFAULT_TASKS}, or none when --harness is given")
    p.add_argument("--corpora", type=str_list, default=["shakespeare", "bible", "wikipedia"],
                   help="comma-separated corpora the task texts come from")
    p.add_argument("--examples", type=positive_int, default=40,
                   help="examples per lastword/nextline task")
    p.add_argument("--context", type=positive_int, default=384,
                   help="prompt tokens of lastword/nextline")
    p.add_argument("--ppl-docs", type=positive_int, default=6, help="passages for perplexity")
    p.add_argument("--ppl-length", type=int_at_least(2), default=2048,
                   help="tokens per perplexity passage")
    p.add_argument("--passkey-lengths", type=length_list, default=[512, 1024, 2048],
                   help="comma-separated prompt lengths of the passkey task")
    p.add_argument("--passkey-depths", type=float_list, default=[0.1, 0.5, 0.9],
                   help="comma-separated depths (0-1) at which the passkey is planted")
    p.add_argument("--passkey-per-cell", type=positive_int, default=2,
                   help="passkey examples per (length, depth)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the task data")
    p.add_argument("--prefill-timing", type=optional_list(length_list), default=[],
                   help="comma-separated lengths (e.g. 2048,4096,8192): also time prefill")
    p.add_argument("--timing-window", type=positive_int, default=128,
                   help="window of the prefill timing and the decode check")
    p.add_argument("--timing-repeats", type=positive_int, default=1,
                   help="best of N, methods interleaved")
    p.add_argument("--decode-check", type=_decode_check, default=None,
                   help="PROMPT,STEPS (e.g. 2048,64): perplexity and time per step of full vs "
                        "stochastic decoding after an SA prefill at --timing-window")
    p.add_argument("--harness", default="",
                   help="comma-separated lm-evaluation-harness tasks (e.g. hellaswag,arc_easy; "
                        "they download their data): score every method/window on them too")
    p.add_argument("--harness-limit", type=_fraction_or_count, default=None,
                   help="documents per harness task (a fraction if < 1)")
    p.add_argument("--harness-include", default=None,
                   help="folder of extra lm-eval task YAMLs (e.g. local jsonl tasks)")
    p.add_argument("--harness-fewshot", type=nonneg_int, default=None, help="few-shot examples")
    add_threads(p)
    add_out(p, "runs/eval")
    p.add_argument("--merge", type=str_list, default=[],
                   help="comma-separated result folders (shards of one grid run in parallel): "
                        "evaluate nothing, write their combined table, JSON and plot to --out")
    p.add_argument("--versus", type=str_list, default=[],
                   help="with --merge: comma-separated methods to compare every other method "
                        "with at the same measured budget (interpolated between their windows)")
    p.add_argument("--only", type=str_list, default=[],
                   help="with --merge: keep only these comma-separated method labels (in this order)")
    p.add_argument("--quick", action="store_true",
                   help="short default comparison: 4 methods, windows 64 and 128, 12 examples per task")
    add_no_progress(p)
    p.set_defaults(func=run)
    return p


def _merge(args: argparse.Namespace) -> int:
    """--merge: one table, JSON and plot from the results of shards of a grid run in
    parallel (or of separate runs), evaluating nothing."""
    from . import report
    from .sweep import aggregate

    folders = [Path(p) for p in args.merge]
    records, metas = _load_shards(folders)
    if args.only:
        records = _only(records, args.only, args.merge)
    summary = aggregate(records)
    meta = dict(merged=[str(f) for f in folders], parts=metas,
                seconds=round(sum(m.get("seconds", 0) for m in metas), 1))
    paths = report.save(ensure_folder(args.out, "--out"), meta, records, summary, None)
    print(report.markdown_table(summary))
    if args.versus:
        table = report.equal_budget_table(summary, args.versus)
        (Path(args.out) / "equal-budget.md").write_text(table + "\n")
        print("\nAt equal budget:\n" + table)
    print(f"Wrote {paths['json']}, {paths['markdown']}; plot: {paths['plot']}")
    return 0


def _load_shards(folders: list[Path]) -> tuple[list[dict], list[dict]]:
    """The records and meta of every folder's results.json; a missing or corrupt one is a
    user error."""
    from . import report

    for folder in folders:
        if not (folder / "results.json" if folder.is_dir() else folder).is_file():
            raise UsageError(f"--merge: {folder} holds no results.json")
    try:
        return report.load_records(folders)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UsageError(f"--merge: a results.json is corrupt ({type(err).__name__}: {err})") from None
    except ValueError as err:
        raise UsageError(f"--merge: {err}") from None


def _only(records: list[dict], keep: list[str], merged: list[str]) -> list[dict]:
    """--only: the records of these method labels, in this order (each must have results)."""
    missing = set(keep) - {r["label"] for r in records}
    if missing:
        raise UsageError(f"--only: no results for {sorted(missing)} in {','.join(merged)}")
    return sorted((r for r in records if r["label"] in keep), key=lambda r: keep.index(r["label"]))


def _harness_options(args: argparse.Namespace) -> dict:
    """The lm-evaluation-harness keywords of the --harness-* options (a limit >= 1 counts
    documents, a smaller one is a fraction of each task)."""
    limit = args.harness_limit
    return dict(include_path=args.harness_include, num_fewshot=args.harness_fewshot,
                limit=int(limit) if limit and limit >= 1 else limit)


def _write_harness(folder: Path, records: list[dict]) -> str:
    """harness.json and harness.md beside the other results; returns the table."""
    from .harness import harness_table

    table = harness_table(records)
    (folder / "harness.json").write_text(json.dumps(records, indent=1))
    (folder / "harness.md").write_text(table + "\n")
    return table


def _run_trained(args: argparse.Namespace, folder: Path) -> int:
    """An SA-Llama saved by ``sattn train`` (its final/ folder): lm-eval tasks only, scored
    with the attention the model was trained with (the methods patch released models)."""
    from .harness import harness_trained, load_trained

    where = f"--model {args.model} is an SA-Llama (e.g. a sattn train final/ folder)"
    if not args.harness:
        raise UsageError(f"{where}: give --harness TASKS to score it with lm-evaluation-harness")
    if args.methods not in (DEFAULT_METHODS, "full"):
        raise UsageError(f"{where}, scored with its own attention: drop --methods")
    ignored = [flag for flag, value in (("--tasks", args.tasks not in (None, ["none"])),
                                        ("--prefill-timing", bool(args.prefill_timing)),
                                        ("--decode-check", bool(args.decode_check))) if value]
    if ignored:
        raise UsageError(f"{where}: only --harness tasks apply to it; drop {', '.join(ignored)}")
    out = ensure_folder(args.out, "--out")
    try:
        model, tokenizer = load_trained(folder)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {args.model} cannot be loaded: {err}") from None
    records = harness_trained(model, tokenizer, args.harness, **_harness_options(args))
    table = _write_harness(out, records)
    print("lm-evaluation-harness:\n" + table)
    print(f"Wrote {out / 'harness.json'}, {out / 'harness.md'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """``sattn eval``: transformers is imported first, so --no-progress silences its bars too."""
    from ..models import load_pretrained  # noqa: F401 (imports transformers)
    from ..progress import disabled

    with disabled(args.no_progress):  # (again, now that transformers is imported)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Check every option, load the model, score the grid, then report. A trained SA-Llama
    and --merge take their own paths."""
    if args.merge:
        return _merge(args)
    _apply_settings(args)
    specs, names = _checked_methods_and_tasks(args)
    trained = _trained_model_folder(args)
    if trained is not None:
        return _run_trained(args, trained)
    out = ensure_folder(args.out, "--out")
    started = time.time()
    model, tokenizer = _load_model(args)
    docs = _documents(args, names)
    task_list = _build_tasks(args, tokenizer, docs, names)
    results = _measure(args, model, tokenizer, specs, task_list, docs)
    meta = run_meta(args, started, model=args.model) | dict(
        examples={t.name: len(t.examples) for t in task_list})
    _report(out, meta, **results)
    return 0


def _apply_settings(args: argparse.Namespace) -> None:
    """--quick replaces the grid's sizes; --threads applies before any torch work."""
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    set_threads(args.threads)


def _checked_methods_and_tasks(args: argparse.Namespace) -> tuple[list, list[str]]:
    """The method specs and task names, checked before the (slow) model load."""
    from . import tasks as T
    from .methods import parse_methods

    try:
        specs = parse_methods(args.methods)
    except ValueError as err:
        raise UsageError(f"--methods: {err}") from None
    tasks = args.tasks if args.tasks is not None else ["none"] if args.harness else \
        DEFAULT_TASKS.split(",")
    names = [t for t in tasks if t != "none"]
    unknown = set(names) - set(T.TASKS)
    if unknown:
        raise UsageError(f"--tasks: unknown task(s) {sorted(unknown)}; choose from {T.TASKS}")
    bad_depths = [d for d in args.passkey_depths if not 0 <= d <= 1]
    if bad_depths:
        raise UsageError(f"--passkey-depths must lie in [0, 1], got {bad_depths}")
    return specs, names


def _trained_model_folder(args: argparse.Namespace) -> Path | None:
    """The folder of --model if it holds an SA-Llama (scored as trained, not patched);
    a path that does not exist is a user error, not an HF id."""
    model_path = Path(args.model).expanduser()
    if args.model.startswith((".", "/", "~")) and not model_path.exists():
        raise UsageError(f"--model {args.model}: no such folder (give a built-in name, an HF id "
                         "or the folder of a saved model)")
    if (model_path / "config.json").is_file() and json.loads(
            (model_path / "config.json").read_text()).get("model_type") == "sa_llama":
        return model_path
    return None


def _load_model(args: argparse.Namespace):
    """The released model and its tokenizer; a load failure is reported in one line."""
    from ..models import load_pretrained

    try:
        return load_pretrained(args.model)
    except OSError as err:  # a missing or broken folder, or an id not in the local cache
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {args.model} cannot be loaded: {first}") from None


def _documents(args: argparse.Namespace, names: list[str]) -> list:
    """The corpora's documents, read only when a task or the decode check needs text."""
    from ..data.corpora import load_corpus

    return [d for c in args.corpora for d in load_corpus(c)] \
        if names or args.decode_check else []


def _build_tasks(args: argparse.Namespace, tokenizer, docs: list, names: list[str]) -> list:
    """The tasks named, built from the documents with --data-seed (the same for every method)."""
    from . import tasks as T

    s = args.data_seed
    builders = {
        "perplexity": lambda: T.perplexity_task(tokenizer, docs, count=args.ppl_docs,
                                                length=args.ppl_length, seed=s),
        "passkey": lambda: T.passkey_task(tokenizer, docs, lengths=args.passkey_lengths,
                                          depths=args.passkey_depths,
                                          per_cell=args.passkey_per_cell, seed=s),
        "lastword": lambda: T.lastword_task(tokenizer, docs, count=args.examples,
                                            context=args.context, seed=s),
        "nextline": lambda: T.nextline_task(tokenizer, docs, count=args.examples,
                                            context=args.context, seed=s),
    }
    return [builders[n]() for n in names]


def _measure(args: argparse.Namespace, model, tokenizer, specs: list, task_list: list,
             docs: list) -> dict:
    """Score every method/window/seed on the tasks (and the harness), then the optional
    prefill timing and decode check; what was not asked for is None."""
    from . import tasks as T
    from .sweep import aggregate, decode_cost, run_sweep, time_prefill

    records = run_sweep(model, tokenizer, specs, args.windows, args.seeds, task_list)
    results = dict(records=records, summary=aggregate(records), harness=None, timings=None,
                   decoding=None)
    if args.harness:
        from .harness import harness_sweep

        results["harness"] = harness_sweep(model, tokenizer, specs, args.windows, args.seeds,
                                           args.harness, **_harness_options(args))
    if args.prefill_timing:
        results["timings"] = time_prefill(model, specs, args.timing_window, args.prefill_timing,
                                          args.timing_repeats)
    if args.decode_check:
        prompt, steps = args.decode_check
        ids = T.perplexity_task(tokenizer, docs, count=1, length=prompt + steps,
                                seed=args.data_seed).examples[0]
        results["decoding"] = decode_cost(model, ids, prompt, args.timing_window)
    return results


def _report(out: Path, meta: dict, *, records: list, summary: list, harness: list | None,
            timings: list | None, decoding: list | None) -> None:
    """Write JSON, markdown and plot to ``out`` and print the tables."""
    from . import report

    paths = report.save(out, meta, records, summary, timings, decoding)
    if summary:
        print(report.markdown_table(summary))
    if harness:
        table = _write_harness(paths["json"].parent, harness)
        print("\nlm-evaluation-harness (mean over seeds):\n" + table)
    if timings:
        print("\nPrefill time, ratio to full attention:\n" + report.timing_table(timings))
    if decoding:
        print("\nDecoding after an SA prefill:\n" + report.decode_table(decoding))
    print("\nkeys/q = mean attended keys per query and head over all layers.")
    plot = f"; plot: {paths['plot']}" if "plot" in paths else ""
    print(f"Wrote {paths['json']}, {paths['markdown']}{plot}")
