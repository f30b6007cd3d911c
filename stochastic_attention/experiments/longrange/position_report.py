"""Loss-by-position results as people read them: a markdown table and a log2-axis plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


def bucket_name(lo: int, hi: int) -> str:
    return str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"


def markdown_table(result: dict) -> str:
    """Rows: methods; columns: position buckets (mean loss in nats), then keys/query and the
    mean over all tokens."""
    methods = result["methods"]
    if not methods:
        raise ValueError("result has no methods to tabulate")
    buckets = methods[0]["buckets"]
    head = ["method", *[bucket_name(b["lo"], b["hi"]) for b in buckets], "all", "keys/q"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in methods:
        keys = m.get("keys_per_query")
        cells = [f"{b['mean']:.3f}" for b in m["buckets"]]
        lines.append("| " + " | ".join([m["label"], *cells, f"{m['mean_loss']:.3f}",
                                        "-" if keys is None else f"{keys:.0f}"]) + " |")
    return "\n".join(lines)


def paired_gap(bucket: dict, reference: dict) -> tuple[float, float]:
    """(mean, standard error) over documents of this bucket's loss minus the reference's, on
    the same documents (needs ``doc_means``); the error is NaN with fewer than 2 documents."""
    diffs = [a - b for a, b in zip(bucket["doc_means"], reference["doc_means"])
             if a is not None and b is not None]
    if not diffs:
        return float("nan"), float("nan")
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def _reference(result: dict, reference: str | None) -> dict | None:
    if reference is None:
        return None
    found = [m for m in result["methods"] if m["label"] == reference]
    return found[0] if found and "doc_means" in found[0]["buckets"][0] else None


def gap_table(result: dict, reference: str = "full") -> str:
    """Rows: methods; columns: buckets; cells: loss minus ``reference``'s on the same documents,
    +- the standard error over documents (paired)."""
    ref = _reference(result, reference)
    if ref is None:
        raise ValueError(f"reference {reference!r} is not a method of this result (with "
                         "per-document means); pick one of "
                         f"{[m['label'] for m in result['methods']]}")
    head = ["method", *[bucket_name(b["lo"], b["hi"]) for b in ref["buckets"]]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in result["methods"]:
        if m is ref:
            continue
        cells = []
        for b, r in zip(m["buckets"], ref["buckets"]):
            gap, err = paired_gap(b, r)
            cells.append(f"{gap:+.2f}" + ("" if err != err else f" ± {err:.2f}"))
        lines.append("| " + " | ".join([m["label"], *cells]) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str | Path, *, title: str | None = None,
         error: str = "doc_sem", reference: str | None = "full") -> Path:
    """Mean loss per bucket against position (log2 axis, at each bucket's geometric middle),
    one line per method with a band of +-1 standard error (``error``: "doc_sem" or "sem").
    A dotted vertical line marks the window of each sliding-window method. With a
    ``reference`` method (with per-document means) a lower panel shows every other method's
    loss minus the reference's on the same documents, with a paired standard-error band."""
    from ...viz import pyplot, save_figure

    plt = pyplot()

    if error not in ("doc_sem", "sem"):
        raise ValueError(f"error must be 'doc_sem' or 'sem', got {error!r}")
    ref = _reference(result, reference)
    if ref is None:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        gap_ax = None
    else:
        fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(7.5, 7.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 2]})
    for m in result["methods"]:
        xs = [math.sqrt(b["lo"] * (b["hi"] - 1)) if b["hi"] - b["lo"] > 1 else b["lo"]
              for b in m["buckets"]]
        ys = [b["mean"] for b in m["buckets"]]
        errs = [b[error] if b[error] == b[error] else 0.0 for b in m["buckets"]]  # NaN -> 0
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=m["label"])
        ax.fill_between(xs, [y - e for y, e in zip(ys, errs)], [y + e for y, e in zip(ys, errs)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        if m.get("method") == "sliding_window" and m.get("window"):  # where its reach ends
            for axis in (ax, gap_ax) if gap_ax is not None else (ax,):
                axis.axvline(m["window"], color=line.get_color(), linestyle=":", linewidth=1)
        if gap_ax is not None and m is not ref:
            gaps = [paired_gap(b, r) for b, r in zip(m["buckets"], ref["buckets"])]
            g = [x for x, _ in gaps]
            e = [y if y == y else 0.0 for _, y in gaps]
            gap_ax.plot(xs, g, marker="o", ms=3, color=line.get_color())
            gap_ax.fill_between(xs, [a - b for a, b in zip(g, e)], [a + b for a, b in zip(g, e)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
    _clip_outliers(ax, result)
    ax.set_xscale("log", base=2)
    bottom = ax if gap_ax is None else gap_ax
    bottom.set_xlabel("position in document (tokens of context)")
    if gap_ax is not None:
        gap_ax.axhline(0, color="black", linewidth=0.8)
        gap_ax.set_ylabel(f"loss minus {reference} (nats)")
        gap_ax.grid(True, which="both", alpha=0.3)
        _clip_gap(gap_ax, result, ref)
    ax.set_ylabel("mean next-token loss (nats)")
    band = "per-document" if error == "doc_sem" else "per-token"
    ax.set_title(title or f"Loss by position, {result['docs']} documents of {result['seq_len']} "
                          f"tokens (band: ±1 {band} s.e.)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _clip_outliers(ax, result: dict) -> None:
    """Scale the y axis to positions >= 2 when position 1 is far above them: with one token
    of context a model without a BOS token can score 20 nats, which would flatten the rest."""
    rest = [b["mean"] for m in result["methods"] for b in m["buckets"] if b["lo"] >= 2]
    first = [b["mean"] for m in result["methods"] for b in m["buckets"] if b["hi"] <= 2]
    if not rest or not first:
        return
    lo, hi = min(rest), max(rest)
    if max(first) > hi + (hi - lo):
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.15 * (hi - lo))
        ax.annotate(f"position 1: {max(first):.1f} nats (off scale)", xy=(0.01, 0.97),
                    xycoords="axes fraction", va="top", fontsize=8)


def _clip_gap(ax, result: dict, ref: dict) -> None:
    """Keep the gap panel readable when one method is far worse than the others: scale it to
    the methods within 1.5 nats of the reference everywhere, if there are any."""
    worst = {m["label"]: max(abs(paired_gap(b, r)[0]) for b, r in zip(m["buckets"],
                                                                       ref["buckets"]))
             for m in result["methods"] if m is not ref}
    close = [v for v in worst.values() if v <= 1.5]
    if close and len(close) < len(worst):
        top = max(close)
        ax.set_ylim(-0.15 * top - 0.02, 1.2 * top + 0.02)
        ax.annotate("methods beyond 1.5 nats: off scale (see the table)", xy=(0.01, 0.97),
                    xycoords="axes fraction", va="top", fontsize=8)


def save(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``position.json``, ``position.md`` and ``position.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "position.json", "markdown": out / "position.md",
             "plot": out / "position.png"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    text = "Mean next-token loss (nats) by position:\n\n" + markdown_table(result) + "\n"
    if _reference(result, "full") is not None and len(result["methods"]) > 1:
        text += ("\nLoss minus full attention on the same documents (± paired standard error "
                 "over documents):\n\n" + gap_table(result, "full") + "\n")
    paths["markdown"].write_text(text)
    plot(result, paths["plot"])
    return paths
