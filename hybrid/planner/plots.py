"""PNG figures for `hybrid plan --plot DIR` (matplotlib, Agg backend, no display needed).

  expert_frequency.png   heatmap of pick frequency per (MoE layer, expert): left as stored,
                         right with each layer's experts sorted by frequency (the skew)
  toks_vs_vram.png       predicted decode tok/s against the VRAM budget, one line per strategy
"""

from __future__ import annotations

import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def frequency_heatmap(trace, path: str) -> str:
    plt = _plt()
    from matplotlib.colors import LogNorm

    freq = trace.frequencies()                                   # [L, E]
    positive = freq[freq > 0]
    floor = max(1e-6, 0.5 / max(1, trace.tokens), float(positive.min()) / 2 if positive.size else 0)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for ax, data, title in ((axes[0], freq, "by expert id"),
                            (axes[1], -np.sort(-freq, axis=1), "each layer sorted")):
        im = ax.imshow(np.maximum(data, floor), aspect="auto", interpolation="nearest",
                       norm=LogNorm(vmin=floor, vmax=max(floor * 10, float(freq.max()))),
                       cmap="viridis", origin="lower",
                       extent=(-0.5, trace.num_experts - 0.5, trace.layers[0] - 0.5,
                               trace.layers[-1] + 0.5))
        ax.set_xlabel("expert" if title == "by expert id" else "expert rank in its layer")
        ax.set_ylabel("decoder layer")
        ax.set_title(f"pick probability per token, {title}")
    fig.colorbar(im, ax=axes, label="P(expert picked by a token)")
    kind = "SYNTHETIC trace" if trace.synthetic else "recorded trace"
    fig.suptitle(f"{trace.model_id}: {kind}, {trace.tokens} tokens")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def toks_vs_vram(sweep: dict, budgets_gib: list, path: str, title: str,
                 mark_gib: float | None = None) -> str:
    """sweep: strategy -> list of decode tok/s (None where the model does not fit)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for name, ys in sweep.items():
        xs = [b for b, y in zip(budgets_gib, ys) if y is not None]
        dashed = name == "plan"   # so a baseline it coincides with stays visible
        ax.plot(xs, [y for y in ys if y is not None], marker="o", ms=3, label=name,
                ls="--" if dashed else "-", lw=2.2 if dashed else 1.5)
    if mark_gib:
        ax.axvline(mark_gib, color="grey", ls="--", lw=1)
    ax.set_xlabel("VRAM (GiB)")
    ax.set_ylabel("predicted decode tok/s (batch 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(out_dir: str, trace, sweep: dict, budgets_gib: list, title: str,
              mark_gib: float | None = None) -> list:
    os.makedirs(out_dir, exist_ok=True)
    return [frequency_heatmap(trace, os.path.join(out_dir, "expert_frequency.png")),
            toks_vs_vram(sweep, budgets_gib, os.path.join(out_dir, "toks_vs_vram.png"), title,
                         mark_gib)]
