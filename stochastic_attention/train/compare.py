"""The paper-style pre-training comparison: train each config x seed, evaluate, report.

For every run: validation loss / perplexity per corpus (per token; bytes for the byte-level
tokenizer), the pass-key probe at a distance inside the window and one far beyond the
SWA receptive field, and zero-shot cloze accuracy (``cloze.py``). Writes ``results.json``
under the output root and beside the report (per-seed numbers), a loss-curve plot and a
Markdown report. Finished runs are skipped and interrupted ones resumed, so the command can
be re-run until everything is done; the report is rewritten after every run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..cli_args import UsageError
from ..data import ChunkSampler, load_tokenizer, parse_source, prepare_source
from ..models import SALlamaForCausalLM
from ..nn.options import SlidingWindowOptions
from . import checkpoint
from .cloze import CLOZE_TASKS, cloze_accuracy, heldout_documents
from .config import ExperimentConfig, load_config
from .distributed import DistInfo, launched_rank
from .loop import evaluate, train
from .passkey import passkey_accuracy

NOTES_MARKER = "<!-- notes: text below this line is kept when the report is regenerated -->"


def evaluate_run(cfg: ExperimentConfig, out_dir: Path, *, eval_chunks: int,
                 passkey_trials: int, cloze: dict | None = None) -> dict:
    """Scores of a finished run's final model (cached in ``eval.json``).

    ``cloze``: ``{"examples", "context", "seed"}`` adds zero-shot cloze accuracy; a cached
    result without it (or with other settings) gets it added, nothing else is recomputed.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cached = out_dir / "eval.json"
    result = json.loads(cached.read_text()) if cached.exists() else None
    stale_cloze = cloze is not None and (result or {}).get("cloze", {}).get("settings") != cloze
    if result is not None and not stale_cloze:
        return result
    model = SALlamaForCausalLM.from_pretrained(out_dir / "final").eval()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if result is None:
        result = _perplexity_and_passkey(cfg, model, tokenizer, eval_chunks=eval_chunks,
                                         passkey_trials=passkey_trials)
    if cloze is not None:
        result["cloze"] = {"settings": cloze, **cloze_accuracy(
            model, tokenizer, heldout_documents(cfg), **cloze)}
    cached.write_text(json.dumps(result, indent=1))
    return result


def _perplexity_and_passkey(cfg: ExperimentConfig, model, tokenizer, *, eval_chunks: int,
                            passkey_trials: int) -> dict:
    splits = [prepare_source(parse_source(s), tokenizer, cfg.data.cache_dir,
                             val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
              for s in cfg.data.sources]
    seq_len = cfg.train.seq_len
    samplers = {s.name: ChunkSampler([s.val], seq_len) for s in splits}
    val = evaluate(model, samplers, micro_batch_size=8, batches=max(1, eval_chunks // 8),
                   precision="fp32", info=DistInfo())
    filler = np.concatenate([np.asarray(s.val) for s in splits])
    # the configs' shared window (the default of the windowed methods when they set none)
    window = min(model.config.attention_options.get("window", SlidingWindowOptions().window),
                 seq_len)
    reach = model.config.num_hidden_layers * (window - 1)  # SWA receptive field
    # near: inside one window (the shortest fitting distance is about 25 byte tokens);
    # far: at least twice the SWA receptive field, when the sequence allows it
    distances = {"near": max(window - 4, 25), "far": min(seq_len - 64, max(2 * reach, 256))}
    passkey = {name: dict(passkey_accuracy(model, tokenizer, filler, seq_len=seq_len,
                                           distance=d, trials=passkey_trials), distance=d)
               for name, d in distances.items()}
    return {"val_loss": val, "passkey": passkey,
            "params": sum(p.numel() for p in model.parameters())}


def _curve(out_dir: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            steps.append(record["step"])
            values.append(record[key])
    return steps, values


def plot_curves(runs: list[dict], path: Path) -> None:
    from ..viz import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {}
    for run in runs:
        colour = colours.setdefault(run["name"], f"C{len(colours)}")
        label = f"{run['name']} (seed {run['seed']})"
        steps, loss = _curve(Path(run["out_dir"]), "loss")
        if loss:  # a running mean over ~5% of the run makes the trend readable
            k = max(1, len(loss) // 20)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            axes[0].plot(steps[k - 1:], smooth, color=colour, label=label,
                         linestyle="-" if run["seed"] == runs[0]["seed"] else "--")
        steps, val = _curve(Path(run["out_dir"]), "val_loss_mean")
        axes[1].plot(steps, val, marker="o", color=colour, label=label,
                     linestyle="-" if run["seed"] == runs[0]["seed"] else "--")
    axes[0].set(title="training loss (running mean)", xlabel="step", ylabel="nats / token")
    axes[1].set(title="validation loss (mean over corpora)", xlabel="step",
                ylabel="nats / token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _mean_spread(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def write_report(runs: list[dict], path: Path, *, command: str, plot: Path,
                 header: str) -> None:
    by_name = defaultdict(list)
    for run in runs:
        by_name[run["name"]].append(run)
    corpora = list(runs[0]["eval"]["val_loss"]) if runs else []
    lines = [
        "# Pre-training comparison: full attention, SWA, SA, gated SA + SWA", "",
        header, "",
        f"- Command: `{command}`",
        f"- Machine: {_machine()}",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Runs finished: {len(runs)} ({', '.join(sorted(by_name))}; seeds "
        f"{sorted({r['seed'] for r in runs})})", "",
        "Validation perplexity per token (byte-level: per byte; lower is better), from the "
        "final model on held-out documents of each corpus; mean ± half-range over seeds. "
        "Pass key: teacher-forced digit accuracy (chance 0.1) for a 5-digit key planted d tokens "
        "before its copy: inside one window (near) and far beyond the SWA receptive field, "
        "layers x (window - 1) (far). Gain: the answer's loss with a different key planted "
        "minus with the right one (nats per digit; > 0 means the model reads the key).",
        "",
    ]
    cloze = runs[0]["eval"].get("cloze") if runs else None
    if cloze:
        cs = cloze["settings"]
        lines += [
            f"Cloze, zero-shot, on held-out documents (the same {cs['examples']} examples per "
            f"task for every model, seed {cs['seed']}, contexts of the last {cs['context']} "
            "tokens): lastword (LAMBADA-like), greedy decoding must produce the passage's final "
            "word, which occurs earlier in it (chance about 0); nextline (HellaSwag-like), the "
            "true next sentence must have the highest mean log-probability per token among 4 "
            "(chance 0.25).", ""]
    head = ["method", "params", "steps", "seeds", *[f"ppl {c}" for c in corpora],
            "bits/token (mean)",
            *([f"{t} acc (n={cloze[t]['examples']})" for t in CLOZE_TASKS] if cloze else []),
            "pass key near: acc / gain", "pass key far: acc / gain"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, group in by_name.items():
        ev = [r["eval"] for r in group]
        ppl = [_mean_spread([math.exp(e["val_loss"][c]) for e in ev]) for c in corpora]
        bpb = _mean_spread([np.mean(list(e["val_loss"].values())) / math.log(2) for e in ev], 3)
        near, far = (
            _mean_spread([e["passkey"][d]["digit_accuracy"] for e in ev]) + " / "
            + _mean_spread([e["passkey"][d]["retrieval_gain"] for e in ev], 3)
            for d in ("near", "far"))
        d_near, d_far = ev[0]["passkey"]["near"]["distance"], ev[0]["passkey"]["far"]["distance"]
        seeds = ",".join(str(r["seed"]) for r in group)
        accs = [_cloze_cell(ev, t) for t in CLOZE_TASKS] if cloze else []
        lines.append(f"| {name} | {ev[0]['params']:,} | {group[0]['steps']} | {seeds} | "
                     + " | ".join([*ppl, bpb, *accs])
                     + f" | {near} (d={d_near}) | {far} (d={d_far}) |")
    lines += ["", f"![loss curves]({plot.name})", "", NOTES_MARKER]
    # Hand-written analysis below the marker survives regeneration of the tables.
    notes = ""
    if path.exists() and NOTES_MARKER in path.read_text():
        notes = path.read_text().split(NOTES_MARKER, 1)[1].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + notes)


def _cloze_cell(evals: list[dict], task: str) -> str:
    values = [e.get("cloze", {}).get(task, {}).get("accuracy") for e in evals]
    return "n/a" if None in values else _mean_spread(values)


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} GPU, torch {torch.__version__}"
    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
            f"no GPU, torch {torch.__version__}")


def run_comparison(configs: list[Path], seeds: list[int], *, out_root: Path, report: Path,
                   overrides: list[str], eval_chunks: int = 32, passkey_trials: int = 64,
                   header: str = "", progress: bool = True,
                   report_only: bool = False, cloze_examples: int = 50, cloze_context: int = 256,
                   cloze_seed: int = 0) -> list[dict]:
    """Train, evaluate and report every (config, seed); ``report_only``: finished runs only.

    ``cloze_examples`` per cloze task (0: no cloze accuracy), with contexts of
    ``cloze_context`` tokens, built with ``cloze_seed`` (the same examples for every run).
    """
    if cloze_examples < 0 or cloze_context < 1:
        raise UsageError(f"cloze_examples must be >= 0 and cloze_context >= 1, got "
                         f"{cloze_examples}, {cloze_context}")
    cloze = (dict(examples=cloze_examples, context=cloze_context, seed=cloze_seed)
             if cloze_examples else None)
    # The command that reproduces the report from scratch (--report-only only re-reads runs).
    argv = [a for a in sys.argv[1:] if a != "--report-only"]
    command = "sattn " + shlex.join(argv) if argv else "run_comparison(...)"
    # Under torchrun every process trains; only rank 0 evaluates and writes the reports.
    main = launched_rank() == 0
    if main:
        report.parent.mkdir(parents=True, exist_ok=True)
        out_root.mkdir(parents=True, exist_ok=True)
    plot = report.with_suffix(".png")
    runs = []
    for seed in seeds:
        for config in configs:
            name = Path(config).stem
            out_dir = out_root / f"{name}-seed{seed}"
            cfg = load_config(config, [*overrides, f"train.seed={seed}",
                                       f"train.out_dir={out_dir}"])
            if not (out_dir / "final" / "config.json").exists():
                if report_only:
                    continue
                # resume an interrupted run; a run that never checkpointed starts afresh
                resume = checkpoint.latest(out_dir, checkpoint.current_run_id(out_dir)) is not None
                train(cfg, resume=resume, overwrite=not resume, progress=progress)
            if not main:
                continue
            runs.append({"name": name, "seed": seed, "out_dir": str(out_dir),
                         "steps": cfg.train.steps,
                         "eval": evaluate_run(cfg, out_dir, eval_chunks=eval_chunks,
                                              passkey_trials=passkey_trials, cloze=cloze)})
            (out_root / "results.json").write_text(json.dumps(runs, indent=1))
            report.with_suffix(".json").write_text(json.dumps(runs, indent=1))  # per seed
            plot_curves(runs, plot)
            write_report(runs, report, command=command, plot=plot, header=header)
    if not runs and main:
        raise UsageError(f"no finished run under {out_root}: nothing to report")
    return runs
