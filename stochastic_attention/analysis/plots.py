"""Figures for the coverage and graph measurements (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..viz import pyplot, save_figure
from . import theory

plt = pyplot()

COLORS = {"sliding_window": "tab:blue", "stochastic": "tab:red", "stochastic_block": "tab:orange",
          "gated": "tab:green", "moba": "tab:purple", "dilated": "tab:brown", "full": "black"}


def _finish(ax, xlabel: str, ylabel: str, title: str, which: str = "major") -> None:
    """Axis labels, title, a light grid and the legend: the frame the panels share."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which=which)
    ax.legend(fontsize=8)


def coverage_curves(rows: Sequence[dict], path: Path) -> Path:
    """Coverage fraction of the last token vs depth: mean over seeds with min-max band."""
    modes = sorted({r["causal"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), squeeze=False)
    for ax, causal in zip(axes[0], modes, strict=True):
        sel = [r for r in rows if r["causal"] == causal]
        n, w = sel[0]["seq_len"], sel[0]["window"]
        depth_max = 1
        for r in sel:
            frac = np.asarray(r["sizes"], dtype=float) / r["full"]
            stop = max((int(np.argmax(c >= 1.0)) if (c >= 1.0).any() else len(c) - 1)
                       for c in frac)
            d = np.arange(1, stop + 2)[: frac.shape[1] - 1]
            depth_max = max(depth_max, d[-1])
            color = COLORS.get(r["pattern"])
            ax.plot(d, frac.mean(0)[d], color=color, label=r["pattern"])
            if frac.shape[0] > 1:
                ax.fill_between(d, frac.min(0)[d], frac.max(0)[d], color=color, alpha=0.2)
        d = np.arange(1, depth_max + 1)
        sliding = [theory.swa_field_size(int(x), w, n, causal=causal) / n for x in d]
        ax.plot(d, sliding, "k:", lw=1, label="SWA theory")
        ideal = theory.idealised_sa_fraction(w, n, int(min(depth_max, 60)))
        ax.plot(np.arange(1, len(ideal)), ideal[1:], "k--", lw=1, label="idealised SA")
        ax.set_xscale("log")
        _finish(ax, "layers", "fraction of the sequence reaching the last token",
                f"{'causal' if causal else 'non-causal'}, n={n}, w={w}")
    return save_figure(fig, path)


def layers_vs_length(rows: Sequence[dict], path: Path) -> Path:
    """Layers to full coverage vs sequence length, log-log; open markers: still incomplete at
    the depth cap (a lower bound)."""
    modes = sorted({r["causal"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), squeeze=False)
    for ax, causal in zip(axes[0], modes, strict=True):
        sel = [r for r in rows if r["causal"] == causal]
        w = sel[0]["window"]
        lens = sorted({r["seq_len"] for r in sel})
        for name in dict.fromkeys(r["pattern"] for r in sel):
            xs, ys, xo, yo = [], [], [], []
            for r in (r for r in sel if r["pattern"] == name):
                done = [v for v in r["layers_to_full"] if v is not None]
                if len(done) == len(r["layers_to_full"]):
                    xs.append(r["seq_len"])
                    ys.append(np.mean(done))
                else:
                    xo.append(r["seq_len"])
                    yo.append(r["max_layers"])
            color = COLORS.get(name)
            ax.plot(xs, ys, "o-", color=color, label=name)
            if xo:
                ax.plot(xo, yo, "o", mfc="none", color=color)
        ax.plot(lens, [theory.swa_layers_to_full(w, n, causal=causal) for n in lens], "k:",
                lw=1, label="SWA theory")
        ax.plot(lens, [theory.idealised_sa_layers_to_full(w, n) for n in lens], "k--", lw=1,
                label="idealised SA")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _finish(ax, "sequence length n", "layers until the last token sees all n",
                f"{'causal' if causal else 'non-causal'}, w={w} (open: not full at cap)", "both")
    return save_figure(fig, path)


def per_position(rows: Sequence[dict], path: Path) -> Path:
    """Per-position coverage after several depths (one panel per scheme), and the keys each
    position sees in one layer; curves are moving averages over n/128 positions."""
    panels = len(rows) + 1
    cols, lines = 2, -(-panels // 2)
    fig, axes = plt.subplots(lines, cols, figsize=(6.0 * cols, 4.0 * lines), squeeze=False)
    axes = axes.ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis")
    for ax, r in zip(axes, rows, strict=False):
        depths = sorted(r["coverage"], key=int)
        for i, d in enumerate(depths):
            if d == "0":
                continue
            ax.plot(_smooth(r["coverage"][d]), color=cmap(i / max(1, len(depths) - 1)), lw=1,
                    label=f"L={d}")
        ax.set_title(f"{r['pattern']} ({'causal' if r['causal'] else 'non-causal'}), "
                     f"n={r['seq_len']}, w={r['window']}", fontsize=9)
        ax.set_xlabel("position")
        ax.set_ylabel("coverage of allowed sources")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    ax = axes[panels - 1]
    for r in rows:
        ax.plot(_smooth(r["keys_one_layer"]), color=COLORS.get(r["pattern"]), lw=1,
                label=r["pattern"])
    ax.set_title("keys seen in one layer (moving average)", fontsize=9)
    ax.set_xlabel("position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _smooth(values: Sequence[float]) -> np.ndarray:
    """Moving average over n/128 positions (random patterns are noisy token by token)."""
    x = np.asarray(values, dtype=float)
    k = max(1, len(x) // 128)
    return np.convolve(np.pad(x, (k - 1, 0), mode="edge"), np.ones(k) / k, mode="valid")


def spectral_gaps(rows: Sequence[dict], path: Path) -> Path:
    """Spectral gap of the product of the first L mixing matrices vs L."""
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for r in rows:
        gaps = np.asarray(r["gaps"])
        ax.plot(np.arange(1, len(gaps) + 1), gaps, "o-", color=COLORS.get(r["pattern"]),
                label=r["pattern"])
    n, w = rows[0]["seq_len"], rows[0]["window"]
    ax.set_yscale("log")
    _finish(ax, "layers L", "1 - |lambda_2| of P_L ... P_1", f"mixing, non-causal, n={n}, w={w}",
            "both")
    return save_figure(fig, path)
