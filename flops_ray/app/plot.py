"""PNG plots of a run's metrics file (see :mod:`flops_ray.training.metrics_log`), drawn with matplotlib's Agg canvas.

- ``curves.png``: clean loss and test accuracy against the step.
- ``allocation.png``: histogram of per-sample query counts relative to the mean, per layer group.
- ``trace_vs_loss.png``: pilot trace estimate ``T_j`` against the clean loss, per layer group (the
  correlation the Gaussian and Bernoulli allocators exploit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

# Figure objects without pyplot render with the Agg canvas: no display and no global backend switch,
# so importing this module never changes the plotting state of a user's session.
from matplotlib.figure import Figure

from flops_ray.files import atomic_path
from flops_ray.training.metrics_log import read_metrics


def _groups(table: pa.Table) -> list[str]:
    return [name.split("/", 1)[1] for name in table.column_names if name.startswith("counts/")]


def _flat(table: pa.Table, column: str) -> np.ndarray:
    values = [v for v in table.column(column).to_pylist() if v is not None]
    return np.concatenate([np.asarray(v, np.float64) for v in values]) if values else np.empty(0)


def plot_curves(table: pa.Table, out: Path) -> Path:
    """Loss and accuracy against the step."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    steps = table.column("step").to_numpy()
    ax_loss.plot(steps, table.column("loss").to_numpy(zero_copy_only=False))
    ax_loss.set(xlabel="step", ylabel="clean loss (batch mean)", title="loss")
    acc = table.column("accuracy").to_pylist()
    evaluated = [(s, a) for s, a in zip(steps, acc) if a is not None]
    if evaluated:
        ax_acc.plot(*zip(*evaluated), marker="o")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="accuracy", ylim=(0, 1))
    fig.tight_layout()
    _save(fig, out)
    return out


def plot_allocation(table: pa.Table, out: Path) -> Path:
    """Histogram of query counts relative to each step's mean count, per group."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for g in _groups(table):
        rel = [np.asarray(c) / np.mean(c) for c in table.column(f"counts/{g}").to_pylist() if c]
        if rel:
            ax.hist(np.concatenate(rel), bins=40, alpha=0.6, label=g)
    ax.set(xlabel="queries / mean queries per sample", ylabel="samples x steps", title="allocation")
    if ax.has_data():
        ax.legend()
    fig.tight_layout()
    _save(fig, out)
    return out


def plot_trace_vs_loss(table: pa.Table, out: Path) -> Path:
    """Per-sample pilot trace estimate against the clean loss (log scale), per group."""
    groups = _groups(table) or ["(none)"]
    fig = Figure(figsize=(5 * len(groups), 4))
    axes = fig.subplots(1, len(groups), squeeze=False)
    losses = _flat(table, "sample_loss")
    for ax, g in zip(axes[0], groups):
        traces = _flat(table, f"trace/{g}") if g in _groups(table) else np.empty(0)
        # A one-draw pilot (MeZO) estimates no traces: its NaNs leave the panel empty.
        known = np.isfinite(traces) if len(traces) == len(losses) else np.zeros(0, bool)
        if known.any():
            ax.scatter(losses[known], np.maximum(traces[known], 1e-30), s=4, alpha=0.4)
            ax.set_yscale("log")
        ax.set(xlabel="clean loss", ylabel="trace estimate T_j", title=f"group {g}")
    fig.tight_layout()
    _save(fig, out)
    return out


def plot_metrics(metrics: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``curves.png``, ``allocation.png`` and ``trace_vs_loss.png`` for a metrics file.

    Returns:
        The paths written.
    """
    table = read_metrics(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_curves(table, out_dir / "curves.png"),
        plot_allocation(table, out_dir / "allocation.png"),
        plot_trace_vs_loss(table, out_dir / "trace_vs_loss.png"),
    ]


def _save(fig: Figure, out: Path) -> None:
    """Write ``fig`` as a PNG at ``out`` atomically (a reader never sees half an image)."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
