"""Figures of the diagnostics, drawn on Agg canvases without pyplot's global figure registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_COLORS = {"correct": "tab:green", "incorrect": "tab:red"}


def distance_curve_figure(curves: dict, figsize=(6.0, 4.0), dpi: int = 100) -> Figure:
    """Mean distance ratio against state position, correct vs incorrect (paper Fig. 2).

    `curves` is the output of `covo.metrics.diagnostics.distance_curves`; empty bins leave gaps.
    """
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = curves["bin_centers"]
    for which, color in _COLORS.items():
        n = curves[f"{which}_trajectories"]
        ax.plot(x, curves[f"{which}_mean"], marker="o", color=color, label=f"{which} (n={n})")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.annotate(
        "below: closer to own answer",
        xy=(0.01, 1.0),
        xycoords=("axes fraction", "data"),
        xytext=(0, -4),
        textcoords="offset points",
        va="top",
        fontsize=8,
        color="gray",
    )
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("normalised state position (i + 1) / T")
    ax.set_ylabel("mean ratio r = D[own] / min D[other]")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def accuracy_bins_figure(bins: list[dict], rewards: list[str], figsize=(7.0, 4.0)) -> Figure:
    """Reward accuracy per bin of the model's per-prompt accuracy, one line per reward with its
    bootstrap interval (paper Fig. 5). `bins` as in `covo.analysis.study_metrics.summarize`."""
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(bins), dtype=float)
    for r, name in enumerate(rewards):
        cells = [b["reward_accuracy"][name] for b in bins]
        value = np.array([np.nan if c["value"] is None else c["value"] for c in cells])
        low = np.array([np.nan if c["low"] is None else c["low"] for c in cells])
        high = np.array([np.nan if c["high"] is None else c["high"] for c in cells])
        shift = (r - (len(rewards) - 1) / 2) * 0.06  # side by side, not on top of each other
        ax.errorbar(
            x + shift, value, yerr=[value - low, high - value], marker="o", capsize=3, label=name
        )
    ax.set_xticks(
        x,
        [
            f"[{b['low']:g}, {b['high']:g}{']' if i == len(bins) - 1 else ')'}\n"
            f"n={b['prompts']} ({b['compared']})"
            for i, b in enumerate(bins)
        ],
    )
    ax.set_xlabel("model accuracy on the prompt (prompts, with K >= 2)")
    ax.set_ylabel("reward accuracy (bootstrap interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Rendered RGB pixels [H, W, 3] uint8, for `add_image(..., dataformats="HWC")`."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write `fig` to `path` (format from the suffix), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _values(cells: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in cells], dtype=float)


def learning_curves_figure(curves: dict[str, dict], ylabel: str, figsize=(8.0, 4.5)) -> Figure:
    """One line per reward: the mean over seeds at each step with its interval as a band.
    `curves[reward]` holds lists `steps`, `value`, `low`, `high` (None where undefined)."""
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        steps = np.asarray(curve["steps"], dtype=float)
        (line,) = ax.plot(steps, _values(curve["value"]), marker=".", label=name)
        low, high = _values(curve["low"]), _values(curve["high"])
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig
