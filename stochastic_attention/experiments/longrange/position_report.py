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


def plot(result: dict, path: str | Path, *, title: str | None = None,
         error: str = "doc_sem") -> Path:
    """Mean loss per bucket against position (log2 axis, at each bucket's geometric middle),
    one line per method with a band of +-1 standard error (``error``: "doc_sem" or "sem").
    A dotted vertical line marks the window of each sliding-window method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if error not in ("doc_sem", "sem"):
        raise ValueError(f"error must be 'doc_sem' or 'sem', got {error!r}")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m in result["methods"]:
        xs = [math.sqrt(b["lo"] * (b["hi"] - 1)) if b["hi"] - b["lo"] > 1 else b["lo"]
              for b in m["buckets"]]
        ys = [b["mean"] for b in m["buckets"]]
        errs = [b[error] if b[error] == b[error] else 0.0 for b in m["buckets"]]  # NaN -> 0
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=m["label"])
        ax.fill_between(xs, [y - e for y, e in zip(ys, errs)], [y + e for y, e in zip(ys, errs)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        if m.get("method") == "sliding_window" and m.get("window"):  # where its reach ends
            ax.axvline(m["window"], color=line.get_color(), linestyle=":", linewidth=1)
    _clip_outliers(ax, result)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in document (tokens of context)")
    ax.set_ylabel("mean next-token loss (nats)")
    band = "per-document" if error == "doc_sem" else "per-token"
    ax.set_title(title or f"Loss by position, {result['docs']} documents of {result['seq_len']} "
                          f"tokens (band: ±1 {band} s.e.)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def save(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``position.json``, ``position.md`` and ``position.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "position.json", "markdown": out / "position.md",
             "plot": out / "position.png"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["markdown"].write_text(markdown_table(result) + "\n")
    plot(result, paths["plot"])
    return paths
