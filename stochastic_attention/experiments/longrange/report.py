"""Summaries of long-range records: the chosen learning rate per group, mean and spread over seeds,
markdown tables and plots (accuracy against depth and against width)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from .methods import METHODS
from .tasks import sample_ceiling


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: list[dict]) -> list[dict]:
    """One row per (task, method, depth, width): the cells at the chosen learning rate.

    The learning rate is the one the sweep chose (its first-seed run had the best validation
    accuracy, at this depth or at the swept depth it reuses); test accuracies are averaged over
    every seed run at that rate.
    """
    by_group = defaultdict(list)
    for r in records:
        by_group[(r["task"], r["method"], r["depth"], r["width"])].append(r)
    rows = []
    for (task, method, depth, width), recs in sorted(by_group.items()):
        first_seed = min(r["cell"]["seed"] for r in recs)
        firsts = [r for r in recs if r["cell"]["seed"] == first_seed]
        # The chosen rate is the one the other seeds ran at (a group at a depth that reuses
        # another depth's rate may also hold an older first-seed run at another rate).
        runs = {lr: sum(r["cell"]["lr"] == lr for r in recs) for lr in {r["cell"]["lr"] for r in recs}}
        best = max(firsts, key=lambda r: (runs[r["cell"]["lr"]], r["val_accuracy"], -r["cell"]["lr"]))
        lr = best["cell"]["lr"]
        chosen = [r for r in recs if r["cell"]["lr"] == lr]
        acc, std = _mean_std([r["accuracy"] for r in chosen])
        row = dict(task=task, method=method, depth=depth, width=width, lr=lr,
                   seeds=sorted(r["cell"]["seed"] for r in chosen), accuracy=acc, accuracy_std=std,
                   keys_per_query=chosen[0]["keys_per_query"],
                   tokens_per_second=statistics.median(r["tokens_per_second"] for r in chosen),
                   seq_len=chosen[0]["cell"]["task"]["seq_len"], options=chosen[0]["cell"]["attention"],
                   lrs_tried=sorted({r["cell"]["lr"] for r in firsts}))
        for name in chosen[0]:
            if name.startswith("accuracy@"):
                row[name], row[name + "_std"] = _mean_std([r[name] for r in chosen])
        rows.append(row)
    return rows


def swa_reach(depth: int, window: int) -> int:
    """Tokens the last position of an SWA stack of ``depth`` layers can see."""
    return depth * (window - 1) + 1


def markdown(rows: list[dict], *, budget: int) -> str:
    """Tables per task: accuracy by method and depth (width 64 or the most common), by width."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        trs = [r for r in rows if r["task"] == task]
        widths = sorted({r["width"] for r in trs})
        main_width = max(widths, key=lambda w: sum(r["width"] == w for r in trs))
        depths = sorted({r["depth"] for r in trs if r["width"] == main_width})
        n = trs[0]["seq_len"]
        margins = sorted({k[len("accuracy@"):] for r in trs for k in r
                          if k.startswith("accuracy@") and not k.endswith("_std")}, key=float)
        out.append(f"### {task}, {n} tokens, width {main_width}\n")
        metric = "test accuracy (mean over margins " + ", ".join(margins) + ")" if margins else \
            "test accuracy at query positions"
        out.append(f"Cells: {metric}, mean ± std over seeds at the learning rate chosen on "
                   "validation; keys/q is the measured mean of attended keys per query.\n")
        head = ["method", "keys/q"] + [f"L={d}" for d in depths]
        if margins:
            hard = margins[0]
            head += [f"L={d} @margin {hard}" for d in depths]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for method in _method_order({r["method"] for r in trs}):
            cells = {r["depth"]: r for r in trs if r["method"] == method and r["width"] == main_width}
            if not cells:
                continue
            any_row = next(iter(cells.values()))
            line = [method, f"{any_row['keys_per_query']:.1f}"]
            line += [_fmt(cells.get(d), "accuracy") for d in depths]
            if margins:
                line += [_fmt(cells.get(d), f"accuracy@{hard}") for d in depths]
            out.append("| " + " | ".join(line) + " |")
        if task == "majority" and margins:
            line = ["SWA ceiling (its last token sees L*(w-1) bits)", ""]
            mean_ceiling = {d: statistics.fmean(sample_ceiling(n - 1, float(m), swa_reach(d, budget) - 1)
                                                for m in margins) for d in depths}
            line += [f"{mean_ceiling[d]:.3f}" for d in depths]
            line += [f"{sample_ceiling(n - 1, float(hard), swa_reach(d, budget) - 1):.3f}" for d in depths]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
        if len(widths) > 1:
            wdepths = sorted({r["depth"] for r in trs if r["width"] != main_width})
            for d in wdepths:
                out.append(f"Accuracy against width at depth {d}:\n")
                out.append("| method | " + " | ".join(f"d={w}" for w in widths) + " |")
                out.append("|---|" + "---|" * len(widths))
                for method in _method_order({r["method"] for r in trs if r["width"] != main_width}):
                    cells = {r["width"]: r for r in trs if r["method"] == method and r["depth"] == d}
                    out.append(f"| {method} | " + " | ".join(_fmt(cells.get(w), "accuracy") for w in widths) + " |")
                out.append("")
    return "\n".join(out)


def _method_order(methods: set[str]) -> list[str]:
    return [m for m in METHODS if m in methods] + sorted(methods - set(METHODS))


def _fmt(row: dict | None, name: str) -> str:
    if row is None or name not in row:
        return "-"
    return f"{row[name]:.3f} ± {row.get(name + '_std', 0.0):.3f}"


def plot(rows: list[dict], path: Path, *, budget: int | None = None) -> None:
    """Accuracy against depth (one panel per task, with SWA's reach ceiling on majority when the
    budget is given) and against width."""
    from ...viz import pyplot, save_figure

    plt = pyplot()

    tasks = sorted({r["task"] for r in rows})
    has_width = any(len({r["width"] for r in rows if r["task"] == t}) > 1 for t in tasks)
    ncols = len(tasks) + (1 if has_width else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        trs = [r for r in rows if r["task"] == task]
        widths = sorted({r["width"] for r in trs})
        main_width = max(widths, key=lambda w: sum(r["width"] == w for r in trs))
        for method in _method_order({r["method"] for r in trs}):
            pts = sorted((r["depth"], r["accuracy"], r["accuracy_std"]) for r in trs
                         if r["method"] == method and r["width"] == main_width)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        depths = sorted({r["depth"] for r in trs if r["width"] == main_width})
        margins = sorted({k[len("accuracy@"):] for r in trs for k in r
                          if k.startswith("accuracy@") and not k.endswith("_std")}, key=float)
        if task == "majority" and budget and margins:
            n = trs[0]["seq_len"]
            ceiling = [statistics.fmean(sample_ceiling(n - 1, float(m), swa_reach(d, budget) - 1)
                                        for m in margins) for d in depths]
            ax.plot(depths, ceiling, "k--", lw=1, label="SWA ceiling (reach)")
        ax.set_xticks(depths)
        ax.set_title(f"{task} ({trs[0]['seq_len']} tokens, width {main_width})")
        ax.set_xlabel("layers")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if has_width:
        ax = axes[0][-1]
        for task in tasks:
            trs = [r for r in rows if r["task"] == task]
            if len({r["width"] for r in trs}) < 2:
                continue
            wdepth = max({r["depth"] for r in trs}, key=lambda d: len({r["width"] for r in trs if r["depth"] == d}))
            for method in _method_order({r["method"] for r in trs}):
                pts = sorted((r["width"], r["accuracy"], r["accuracy_std"]) for r in trs
                             if r["method"] == method and r["depth"] == wdepth)
                if len(pts) > 1:
                    xs, ys, es = zip(*pts)
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{task}: {method}")
            ax.set_title(f"accuracy against width (depth {wdepth})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width d")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
