"""The plots of Table 1 and Figure 5: accuracy curves over seeds, and seconds per step split into their parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def plot_table1(runs: list[dict], path: Path) -> None:
    """Test accuracy against the step, mean over seeds with a ±1 std band, one panel per dataset."""
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    fig = Figure(figsize=(6 * len(datasets), 4.2))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, name in zip(axes, datasets):
        for method in dict.fromkeys(r["method"] for r in runs):
            curves = np.array([r["curve"] for r in runs if (r["dataset"], r["method"]) == (name, method)])
            steps, acc = curves[0, :, 0], curves[:, :, 1]
            line = ax.plot(steps, acc.mean(0), marker="o", markersize=3, label=method)[0]
            ax.fill_between(
                steps, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=line.get_color(), alpha=0.12
            )
        ax.set(title=name, xlabel="step", ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_figure5(figure5: dict, path: Path) -> None:
    """Seconds per step, split into queries and allocator sampling, beside the Gaussian fit's, per dataset."""
    datasets = list(figure5)
    fig = Figure(figsize=(6 * len(datasets), 4.2))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, name in zip(axes, datasets):
        methods = list(figure5[name])
        cells = [figure5[name][m] for m in methods]
        fit = np.array([c["fit_seconds"] for c in cells])
        alloc = np.array([c["allocator_seconds"] for c in cells])
        rest = np.array([c["step_seconds"] for c in cells]) - alloc
        at = np.arange(len(methods))
        ax.bar(at - 0.2, rest, width=0.4, label="clean pass, queries, update")
        ax.bar(at - 0.2, alloc, width=0.4, bottom=rest, label="allocation sampling")
        ax.bar(at + 0.2, fit, width=0.4, hatch="//", label="gaussian fit (in a thread beside the step)")
        ax.set_xticks(at, methods)
        ax.set(title=name, ylabel="seconds per step (median over steps)")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
