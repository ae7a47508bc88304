"""Table 1 from seeded training runs: the methods, each cell's statistics, allocator gains paired by seed, Markdown.

A run record is a dict with its ``dataset``, ``method`` and ``seed`` and what the run measured (``accuracy``,
``queries_per_step``, per-group ``count_cv`` and ``sqrt_trace_cv``, step timings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Method:
    """One row of Table 1."""

    name: str
    estimator: str
    """``bp`` (the backprop baseline: ``TrainConfig.backprop``), or an ``EstimatorConfig`` kind (``spsa``, ``lr``)."""
    allocator: str = "equal"
    """How each group's budget is split over the batch."""
    least_budget: bool = False
    """Spend one pair per data point (MeZO: 2 queries) instead of the shared budget."""
    baseline: str = ""
    """The equal-allocation row this one is compared with seed by seed (allocator gains); empty: none."""


METHODS = (
    Method("BP", "bp"),
    Method("MeZO", "spsa", least_budget=True),
    Method("n-SPSA", "spsa"),
    Method("LR", "lr"),
    Method("OPS-SPSA", "spsa", "gaussian", baseline="n-SPSA"),
    Method("OPS-LR", "lr", "gaussian", baseline="LR"),
    Method("Neyman-SPSA", "spsa", "neyman", baseline="n-SPSA"),
    Method("Neyman-LR", "lr", "neyman", baseline="LR"),
)


def spread(values: list[np.ndarray]) -> float | None:
    """Mean over steps of the coefficient of variation (std / mean) of one group's per-sample values.

    None when the values are unknown (an allocator that read no finite traces).
    """
    if not all(np.isfinite(v).all() for v in values):
        return None
    return float(np.mean([v.std() / max(v.mean(), 1e-30) for v in values]))


def mean_per_group(rows: list[list[float | None]]) -> list[float | None]:
    """Per group, the mean over runs of a :func:`spread` (None where any run's is unknown)."""
    return [None if None in col else float(np.mean(col)) for col in zip(*rows)]


def by_cell(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Runs grouped by dataset, then method, in the order they ran."""
    cells: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        cells.setdefault(r["dataset"], {}).setdefault(r["method"], []).append(r)
    return cells


def accuracy_summary(runs: list[dict]) -> dict:
    """One Table 1 cell: test accuracy mean and sample std over its seeds, and per group the allocation's spread."""
    acc = np.array([r["accuracy"] for r in runs])
    return {
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "seeds": len(runs),
        "queries_per_step": runs[0]["queries_per_step"],
        **{k: mean_per_group([r[k] for r in runs]) for k in ("count_cv", "sqrt_trace_cv")},
    }


def allocator_gains(runs: list[dict], methods: tuple[Method, ...]) -> dict:
    """Accuracy of each allocator row minus its equal-allocation baseline, seed by seed.

    A seed fixes the pretrained body, the head, the batches and the noise of every query index, so the
    difference cancels the seed-to-seed spread that dominates Table 1's std.
    """
    acc = {(r["dataset"], r["method"], r["seed"]): r["accuracy"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    gains: dict[str, dict] = {}
    for d in dict.fromkeys(r["dataset"] for r in runs):
        for m in methods:
            if m.baseline:
                diff = np.array([acc[d, m.name, s] - acc[d, m.baseline, s] for s in seeds])
                gains.setdefault(d, {})[m.name] = {
                    "baseline": m.baseline,
                    "mean": float(diff.mean()),
                    "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                    "per_seed": diff.tolist(),
                }
    return gains


def timing_summary(runs: list[dict]) -> dict:
    """One Figure 5 bar: per-step seconds (each run's median, averaged over seeds).

    The Gaussian allocator's fit runs in a thread beside the step's queries (in-process as on the farm), so
    ``step_seconds`` holds only what the step waited for it; ``fit_seconds`` is the fit's own time.
    """
    return {k: float(np.mean([r[k] for r in runs])) for k in ("step_seconds", "allocator_seconds", "fit_seconds")}


def markdown(cells: dict, cell: Callable[[dict], str]) -> str:
    """A Markdown table of ``{dataset: {method: stats}}``: a row per method, ``cell(stats)`` per dataset."""
    names = list(cells)
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method in cells[names[0]]:
        lines.append(f"| {method} | " + " | ".join(cell(cells[n][method]) for n in names) + " |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def tables(result: dict) -> list[str]:
    """The Markdown tables docs/RESULTS.md shows, from a ``reproduce.json``: accuracy (Table 1), allocator
    gains, allocation spread (counts' CV / sqrt-traces' CV per group) and seconds per step (Figure 5)."""
    summary = result["table1"]
    return [
        markdown(summary, lambda c: f"{100 * c['accuracy_mean']:.1f} ± {100 * c['accuracy_std']:.1f}"),
        markdown(
            result["allocator_gains"], lambda c: f"{100 * c['mean']:+.1f} ± {100 * c['std']:.1f} vs {c['baseline']}"
        ),
        markdown(
            summary, lambda c: ", ".join(f"{a:.2f} / {_num(t)}" for a, t in zip(c["count_cv"], c["sqrt_trace_cv"]))
        ),
        markdown(result["figure5"], lambda c: f"{c['step_seconds']:.3f} (fit {c['fit_seconds']:.3f})"),
    ]


def budget_table(budget: dict) -> str:
    """The budget study as a Markdown table: each arm's queries and mean accuracy, and the paired difference."""
    diff = budget["difference"]
    rows = [
        f"| {arm} | {budget['queries_per_sample'][arm]} | {100 * budget['accuracy_mean'][arm]:.1f} |"
        for arm in ("equal", "default")
    ]
    return "\n".join(
        [
            "| arm | queries per sample and group | test accuracy (mean over seeds) |",
            "|---|---|---|",
            *rows,
            f"| default - equal, paired by seed | | {100 * diff['mean']:+.1f} ± {100 * diff['std']:.1f} |",
        ]
    )
