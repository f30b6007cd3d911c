"""Results as people read them: a markdown table, JSON, and a plot of metric vs budget."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value: float, metric: str) -> str:
    return f"{value:.1f}" if metric == "perplexity" else f"{value:.2f}"


def markdown_table(summary: list[dict]) -> str:
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    cells = {(s["label"], s["window"], s["task"]): s for s in summary}
    rows = list(dict.fromkeys((s["label"], s["window"]) for s in summary))
    head = ["method", "window"]
    for t in tasks:
        s0 = next(s for s in summary if s["task"] == t)
        head += [f"{t} ({s0['metric']}, {s0['length']} tok)", "keys/q"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, window in rows:
        line = [label, "-" if window is None else str(window)]
        for t in tasks:
            s = cells.get((label, window, t))
            if s is None:
                line += ["", ""]
                continue
            spread = f" ± {_fmt(s['std'], s['metric'])}" if s["seeds"] > 1 else ""
            line += [_fmt(s["mean"], s["metric"]) + spread, f"{s['keys_per_query']:.0f}"]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _interpolate(points: list[tuple[float, float]], x: float, log_y: bool) -> float | None:
    """Piecewise-linear in log(x) (and log(y) for perplexity) through sorted points; None outside."""
    import math

    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            if log_y:
                return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
            return y0 + t * (y1 - y0)
    return None


def equal_budget_table(summary: list[dict], versus: list[str]) -> str:
    """Each method's mean next to what each ``versus`` method scores at the SAME measured budget
    (keys per query), interpolated between that method's windows (blank outside its range)."""
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    curves = {(s["label"], s["task"]): [] for s in summary}
    for s in summary:
        if s["window"] is not None:
            curves[(s["label"], s["task"])].append((s["keys_per_query"], s["mean"]))
    head = ["method", "window"]
    for t in tasks:
        head += [t, "keys/q", *[f"{v} at equal keys/q" for v in versus]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = {(s["label"], s["window"], s["task"]): s for s in summary}
    rows = list(dict.fromkeys((s["label"], s["window"]) for s in summary
                              if s["label"] not in versus and s["window"] is not None))
    for label, window in rows:
        line = [label, str(window)]
        for t in tasks:
            s = cells.get((label, window, t))
            if s is None:
                line += [""] * (2 + len(versus))
                continue
            line += [_fmt(s["mean"], s["metric"]), f"{s['keys_per_query']:.0f}"]
            for v in versus:
                y = _interpolate(curves.get((v, t), []), s["keys_per_query"],
                                 s["metric"] == "perplexity")
                line.append("" if y is None else _fmt(y, s["metric"]))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def timing_table(timings: list[dict]) -> str:
    lengths = sorted({t["length"] for t in timings})
    labels = list(dict.fromkeys(t["label"] for t in timings))
    cell = {(t["label"], t["length"]): t for t in timings}
    lines = ["| method | " + " | ".join(f"{n} tok (x full)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for label in labels:
        vals = []
        for n in lengths:
            t = cell.get((label, n))
            vals.append("" if t is None or t["ratio_to_full"] is None
                        else f"{t['ratio_to_full']:.2f} ({t['seconds']:.1f} s)")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> str:
    base = rows[0]["seconds_per_step"]
    lines = ["| setting | continuation perplexity | s/step | x full |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['perplexity']:.2f} | {r['seconds_per_step']:.4f} | "
                     f"{r['seconds_per_step'] / base:.2f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    from ..viz import pyplot, save_figure

    plt = pyplot()

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    # Top row: metric vs nominal window (the paper's Figure 4); bottom row: vs the measured
    # budget, so methods are compared at equal keys per query. Error bars: spread over seeds.
    xs = (("window", "window (nominal budget)"), ("keys_per_query", "mean attended keys per query"))
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7.0), squeeze=False)
    for row, (x_key, x_label) in enumerate(xs):
        for ax, task in zip(axes[row], tasks, strict=True):
            rows = [s for s in summary if s["task"] == task]
            for i, label in enumerate(dict.fromkeys(s["label"] for s in rows)):
                pts = sorted((s for s in rows if s["label"] == label),
                             key=lambda s: s["keys_per_query"])
                if pts[0]["window"] is None:
                    ax.axhline(pts[0]["mean"], color="black", ls="--", lw=1, label=label)
                    continue
                ax.errorbar([p[x_key] for p in pts], [p["mean"] for p in pts],
                            yerr=[p["std"] for p in pts], marker="o", ms=3, capsize=2, label=label,
                            ls="-" if i < 10 else "--")
            ax.set_xscale("log", base=2)
            if rows[0]["metric"] == "perplexity":
                ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_title(f"{task} ({rows[0]['length']} tokens)")
            ax.set_ylabel(rows[0]["metric"])
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="best")
    save_figure(fig, path)


def load_records(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """Records and meta of several ``results.json`` files (e.g. shards of one grid run in
    parallel); a (label, window, seed, task) cell present twice is an error."""
    records, metas, seen = [], [], set()
    for path in paths:
        path = Path(path)
        data = json.loads((path / "results.json" if path.is_dir() else path).read_text())
        for r in data["records"]:
            key = (r["label"], r["window"], r["seed"], r["task"], r["length"])
            if key in seen:
                raise ValueError(f"{path}: cell {key} is already in an earlier file; merge "
                                 "results of different cells only")
            seen.add(key)
            records.append(r)
        metas.append(data["meta"])
    return records, metas


def save(out_dir: Path, meta: dict, records: list[dict], summary: list[dict],
         timings: list[dict] | None, decoding: list[dict] | None = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md",
             "plot": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(dict(meta=meta, records=records, summary=summary,
                                             prefill_timing=timings, decoding=decoding), indent=1))
    parts = [markdown_table(summary)] if summary else []
    if timings:
        parts.append("Prefill time, ratio to full attention:\n\n" + timing_table(timings))
    if decoding:
        parts.append("Decoding after an SA prefill:\n\n" + decode_table(decoding))
    paths["markdown"].write_text("\n\n".join(parts) + "\n")
    if summary:
        plot(summary, paths["plot"])
    else:
        del paths["plot"]
    return paths
