"""PNG plots of what runs measured: training curves and pass@k with its interval.

Drawn with matplotlib's non-interactive Agg backend (no display needed), written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from weighted_mtp.io import atomic_write


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(n_panels, 3)
    rows = math.ceil(n_panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    return plt, fig, [ax for row in axes for ax in row]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], keys: Sequence[str], path: Path) -> Path:
    """One panel per metric key, one line per run, against the optimiser step. A run keeps its colour
    in every panel, and each panel's legend names the runs drawn in it (not every run logs every key)."""
    present = [k for k in keys if any(k in row for rows in histories.values() for row in rows)]
    if not present:
        raise ValueError(f"none of {list(keys)} was logged by {list(histories)}")
    plt, fig, axes = _figure(len(present))
    colours = {name: f"C{i % 10}" for i, name in enumerate(histories)}
    for ax, key in zip(axes, present):
        for name, rows in histories.items():
            points = [(i + 1, row[key]) for i, row in enumerate(rows) if key in row and math.isfinite(row[key])]
            if points:
                ax.plot(*zip(*points), label=name, color=colours[name], linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(present):]:
        ax.axis("off")
    return _save(plt, fig, path)


def pass_at_k_chart(rows: Mapping[str, Mapping[str, float]], title: str, path: Path) -> Path:
    """One bar per arm: the mean pass@k in percent, with its 95% interval as an error bar."""
    plt, fig, (ax, *_) = _figure(1)
    names = list(rows)
    means = [100 * rows[n]["mean"] for n in names]
    low = [m - 100 * rows[n]["ci_low"] for m, n in zip(means, names)]
    high = [100 * rows[n]["ci_high"] - m for m, n in zip(means, names)]
    ax.bar(names, means, yerr=[low, high], capsize=4, color="#4C72B0")
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def weight_histogram(counts: Mapping[str, Sequence[float]], edges: Sequence[float], title: str, path: Path) -> Path:
    """Bars of token counts per weight bin (`edges`: the bins' bounds, log-spaced), one series per
    label (passing and failing solutions), and the tokens of weight 0 apart, at the left."""
    plt, fig, (ax, *_) = _figure(1)
    for label, row in counts.items():
        zero, bins = row[0], row[1:]
        ax.stairs(bins, edges, label=f"{label} ({int(sum(row))} tokens, {int(zero)} at 0)", linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xlabel("head 1's loss weight")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)
