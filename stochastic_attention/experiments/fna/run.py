"""The FNA text-classification experiment: accuracy grid, attention-graph statistics, plots.

For every attention variant x embedding size x seed: build the seeded document split, train a
one-layer one-head encoder, record test accuracy. Then, for the models of one size and seed,
measure the spectral gap and mean shortest path of the attention graph on test passages and
draw diffusion-map embeddings. Writes results.json, table.md and PNG figures.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...models.fna_classifier import RENAMED_OPTIONS, ClassifierConfig
from ...progress import tqdm
from ...vocabulary import reject_renamed
from .data import ALPHABET, PassageTask, TextDoc, build_task, synthetic_corpora
from .graph import diffusion_map, mean_shortest_path, spectral_gap
from .train import TrainConfig, train_classifier


def load_config(path: str | Path) -> dict[str, Any]:
    import yaml

    from ...cli_args import UsageError

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"config file {path} cannot be read: {' '.join(str(err).split())}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"config file {path} must hold a mapping")
    for key in ("task", "variants", "d_model", "seeds", "train"):
        if key not in cfg:
            raise UsageError(f"config {path} lacks the key {key!r}")
    for variant in cfg["variants"]:  # bad or former option names fail here, before any work
        try:
            ClassifierConfig(vocab_size=2, num_classes=2, **cfg.get("model", {}),
                             d_model=variant.get("d_model", cfg["d_model"])[0],
                             **_variant_fields(variant))
        except (TypeError, ValueError) as err:
            raise UsageError(f"config {path}: {err}") from None
    return cfg


def load_corpora(names: list[str] | str) -> Mapping[str, list[TextDoc]]:
    """Label -> documents. ``"synthetic"`` needs no data; other names go to the corpus loader."""
    if names == "synthetic":
        return synthetic_corpora()
    from ...data.corpora import load_corpus  # the shipped texts (optional extra)

    return {name: load_corpus(name) for name in names}


def run(cfg: dict[str, Any], out_dir: str | Path, figures_dir: str | Path | None = None,
        quick: bool = False) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures_dir = Path(figures_dir) if figures_dir else out_dir
    figures_dir.mkdir(parents=True, exist_ok=True)
    t = cfg["task"]
    train_cfg = TrainConfig(**cfg["train"])
    sizes, seeds = cfg["d_model"], cfg["seeds"]
    if quick:  # a smoke run of the whole pipeline
        train_cfg.steps, sizes, seeds = 10, sizes[:1], seeds[:1]

    corpora = load_corpora(t["corpora"])
    tasks = {seed: build_task(corpora, passage_len=t["passage_len"],
                              test_per_class=t["test_per_class"],
                              test_fraction=t["test_fraction"], seed=seed) for seed in seeds}
    started = time.time()
    runs, models = [], {}
    # A variant may restrict itself to some sizes with its own "d_model" list.
    grid = [(v, d, s) for v in cfg["variants"] for d in sizes for s in seeds
            if d in v.get("d_model", sizes)]
    for variant, d, seed in tqdm(grid, desc="fna grid"):
        task = tasks[seed]
        model_cfg = _model_config(variant, d, task, cfg)
        model, metrics = train_classifier(task, model_cfg, train_cfg, seed,
                                          desc=f"{variant['name']} d={d} seed={seed}")
        runs.append({"variant": variant["name"], "d_model": d, "seed": seed, **metrics})
        models[(variant["name"], d, seed)] = model

    g = cfg.get("graph", {})
    g_d = g.get("d_model", sizes[-1]) if not quick else sizes[0]
    g_seed = g.get("seed", seeds[0]) if not quick else seeds[0]
    graph_models = {v["name"]: models[(v["name"], g_d, g_seed)] for v in cfg["variants"]
                    if (v["name"], g_d, g_seed) in models}
    test = tasks[g_seed].test_tokens  # evenly spread over the classes
    count = g.get("passages", 12)
    passages = test[:: max(1, len(test) // count)][:count]
    graphs = graph_statistics(graph_models, passages, g.get("thresholds", [1.0]))
    plot_diffusion_maps(graph_models, passages[0], figures_dir / "fna-diffusion-map.png")
    summary = summarise(runs)
    plot_accuracy(summary, figures_dir / "fna-accuracy.png")
    result = {
        "config": cfg, "quick": quick, "train": asdict(train_cfg),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(), "seconds": time.time() - started,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "split": tasks[seeds[0]].split, "runs": runs, "summary": summary,
        "graph": {"d_model": g_d, "seed": g_seed, "passages": len(passages), **graphs},
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "table.md").write_text(markdown_tables(result))
    return result


def _variant_fields(variant: dict) -> dict:
    """A variant's ClassifierConfig fields; former names (``stochastic: true``) are errors."""
    fields = {k: v for k, v in variant.items() if k not in ("name", "d_model")}
    reject_renamed(fields, f"variant {variant.get('name')!r}", renamed=RENAMED_OPTIONS)
    return fields


def _model_config(variant: dict, d: int, task: PassageTask, cfg: dict) -> ClassifierConfig:
    return ClassifierConfig(vocab_size=task.vocab_size, num_classes=len(task.labels),
                            d_model=d, **cfg.get("model", {}), **_variant_fields(variant))


def summarise(runs: list[dict]) -> list[dict]:
    rows = {}
    for r in runs:
        rows.setdefault((r["variant"], r["d_model"]), []).append(r["test_accuracy"])
    out = []
    for (variant, d), accs in rows.items():
        out.append({"variant": variant, "d_model": d, "n": len(accs),
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    return out


@torch.no_grad()
def graph_statistics(models: dict, passages: torch.Tensor, thresholds: list[float]) -> dict:
    stats = {}
    for name, model in models.items():
        P = model.attention_weights(passages)[:, 0].double().numpy()  # head 0: [N, n, n]
        gaps = [spectral_gap(p) for p in P]
        stats[name] = {"spectral_gap_mean": float(np.mean(gaps)),
                       "spectral_gap_std": float(np.std(gaps)),
                       "max_weight_mean": float(P.max(-1).mean()), "paths": {}}
        for t in thresholds:
            paths = [mean_shortest_path(p, t) for p in P]
            stats[name]["paths"][str(t)] = {
                "mean": float(np.mean([h for h, _ in paths])),
                "std": float(np.std([h for h, _ in paths])),
                "connected_fraction": float(np.mean([c for _, c in paths])),
            }
    return stats


CHAR_CLASSES = {"space": " ", "vowel": "aeiou", "punctuation": ".,;:!?'-",
                "consonant": "bcdfghjklmnpqrstvwxyz"}


def plot_diffusion_maps(models: dict, tokens: torch.Tensor, path: Path) -> None:
    from ...viz import pyplot, save_figure

    plt = pyplot()

    chars = [ALPHABET[i] for i in tokens.tolist()]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.0), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items(), strict=True):
        P = model.attention_weights(tokens[None])[0, 0].double().numpy()
        emb = diffusion_map(P, 2)
        for label, members in CHAR_CLASSES.items():
            idx = [i for i, c in enumerate(chars) if c in members]
            ax.scatter(emb[idx, 0], emb[idx, 1], s=14, label=label)
        ax.set_title(f"{name}: spectral gap {spectral_gap(P):.3f}", fontsize=10)
        ax.set_xlabel("diffusion coordinate 1")
        ax.set_ylabel("diffusion coordinate 2")
    axes[0][-1].legend(title="token", fontsize=8)
    fig.suptitle("Diffusion maps of the trained attention graph (one test passage,"
                 " one point per character)", y=1.02)
    save_figure(fig, path, bbox_inches="tight")


def plot_accuracy(summary: list[dict], path: Path) -> None:
    from ...viz import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for variant in dict.fromkeys(r["variant"] for r in summary):
        rows = sorted((r for r in summary if r["variant"] == variant), key=lambda r: r["d_model"])
        ax.errorbar([r["d_model"] for r in rows], [100 * r["mean"] for r in rows],
                    yerr=[100 * r["std"] for r in rows], marker="o", capsize=3, label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding size d")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("One layer, one head: passage source classification")
    ax.legend()
    save_figure(fig, path, tight=False, bbox_inches="tight")


def markdown_tables(result: dict) -> str:
    sizes = sorted({r["d_model"] for r in result["summary"]})
    variants = list(dict.fromkeys(r["variant"] for r in result["summary"]))
    cell = {(r["variant"], r["d_model"]): r for r in result["summary"]}
    lines = ["| attention | " + " | ".join(f"d = {d}" for d in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for v in variants:
        vals = [f"{100 * cell[v, d]['mean']:.1f} ± {100 * cell[v, d]['std']:.1f}"
                if (v, d) in cell else "" for d in sizes]
        lines.append(f"| {v} | " + " | ".join(vals) + " |")
    g = result["graph"]
    thresholds = list(next(iter(g[v] for v in variants if v in g))["paths"]) if any(
        v in g for v in variants) else []
    lines += ["", f"Attention graph (d = {g['d_model']}, seed {g['seed']}, "
              f"{g['passages']} test passages, mean ± std; hops over the connected pairs of the"
              " undirected graph with an edge i - j where P_ij or P_ji >= t / n):", "",
              "| attention | spectral gap | mean max weight | "
              + " | ".join(f"hops, t = {t} | connected, t = {t}" for t in thresholds) + " |",
              "|---|---|---|" + "---|---|" * len(thresholds)]
    for v in variants:
        if v in g:
            s = g[v]
            cells = [f"{s['paths'][t]['mean']:.2f} ± {s['paths'][t]['std']:.2f} | "
                     f"{100 * s['paths'][t]['connected_fraction']:.0f}%" for t in thresholds]
            lines.append(f"| {v} | {s['spectral_gap_mean']:.3f} ± {s['spectral_gap_std']:.3f} | "
                         f"{s['max_weight_mean']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
