"""Per-step training metrics as Parquet: a directory of parts that reads as one table (one row per step).

Every ``flush_every`` rows go to a new part, written under a hidden temporary name and renamed into place,
so a run killed at any moment (``ray job stop``, a preempted head) leaves every flushed row readable; only
the rows since the last flush are lost, and a resumed run recomputes them.

Columns: ``step``, ``loss`` (mean clean loss), ``accuracy`` (null between evaluations), ``queries``,
``seconds``, ``queries_per_s``, ``allocator_seconds``, ``fit_seconds``, ``skipped``, ``sample_loss`` (list:
per-sample clean losses), and per layer group ``g``: ``spread/g`` (max/min query count),
``variance_ratio/g`` (``J(A)/J(equal)`` on the allocator's traces: below 1 when allocation pays), ``mean_trace/g``
(null when the pilot measures no trace), ``counts/g`` and ``trace/g`` (lists: per-sample query counts and
pilot trace estimates, for the trace-vs-loss plot), the gradient-quality telemetry ``snr/g``,
``realised_variance_ratio/g`` and ``cosine/g`` (:class:`~flops_ray.step.interface.StepReport`), and the update's
``grad_norm/g`` (before clipping) and ``clipped/g`` (whether ``grad_clip`` scaled it down); per farm counter
``c`` (cumulative, null in-process): ``farm/c``.

>>> import tempfile, pathlib
>>> from flops_ray.step.interface import StepReport
>>> path = pathlib.Path(tempfile.mkdtemp()) / "m.parquet"
>>> with MetricsLog(path, ["head"]) as log:
...     row = log.append(StepReport(step=0, loss=2.3, losses=np.array([2.0, 2.6]), counts=[np.array([2, 6])],
...                           traces=[np.array([1.0, 9.0])], queries=8, seconds=0.5))
>>> read_metrics(path).column("spread/head").to_pylist()
[3.0]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flops_ray.farm.counters import DispatchCounters
from flops_ray.files import atomic_path
from flops_ray.step.interface import StepReport

FARM_COUNTERS = tuple(f.name for f in dataclasses.fields(DispatchCounters))
"""The farm's cumulative counters, one ``farm/<name>`` column each."""
TELEMETRY = ("snr", "realised_variance_ratio", "cosine", "grad_norm")
"""Per-group gradient-quality columns (``<name>/<group>``), from the fields of :class:`StepReport` of those names."""


def _column_change(found: pa.Schema, expected: pa.Schema) -> str:
    """What a resumed run would add and drop, e.g. ``adds ['fit_seconds']``."""
    added = [n for n in expected.names if n not in found.names]
    dropped = [n for n in found.names if n not in expected.names]
    return f"adds {added}, drops {dropped}" if added or dropped else "same names, other types"


def metrics_schema(groups: list[str]) -> pa.Schema:
    """The Parquet schema of a run with layer groups ``groups``."""
    fields = [
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("accuracy", pa.float64()),
        ("queries", pa.int64()),
        ("seconds", pa.float64()),
        ("queries_per_s", pa.float64()),
        ("allocator_seconds", pa.float64()),
        ("fit_seconds", pa.float64()),
        ("skipped", pa.int64()),
        ("sample_loss", pa.list_(pa.float64())),
    ]
    for g in groups:
        fields += [
            (f"spread/{g}", pa.float64()),
            (f"variance_ratio/{g}", pa.float64()),
            (f"mean_trace/{g}", pa.float64()),
            (f"counts/{g}", pa.list_(pa.int64())),
            (f"trace/{g}", pa.list_(pa.float64())),
        ]
        fields += [(f"{name}/{g}", pa.float64()) for name in TELEMETRY]
        fields += [(f"clipped/{g}", pa.bool_())]
    fields += [(f"farm/{name}", pa.int64()) for name in FARM_COUNTERS]
    return pa.schema(fields, metadata={"groups": "\n".join(groups)})


def _finite(values: list[float], i: int) -> float | None:
    """``values[i]`` when it exists and is finite, else None (a null cell)."""
    value = values[i] if i < len(values) else float("nan")
    return float(value) if np.isfinite(value) else None


def metrics_row(log: StepReport, groups: list[str], farm: dict[str, int] | None = None) -> dict[str, Any]:
    """One step's row of the metrics table (:func:`metrics_schema`): what every logger writes at step ``log.step``.

    Args:
        log: the step's report.
        groups: layer group names, in the report's order.
        farm: the farm's cumulative counters after the step (None: an in-process run, null cells).
    """
    row: dict[str, Any] = {
        "step": log.step,
        "loss": log.loss,
        "accuracy": log.accuracy,
        "queries": log.queries,
        "seconds": log.seconds,
        "queries_per_s": log.queries / log.seconds if log.seconds > 0 else None,
        "allocator_seconds": log.allocator_seconds,
        "fit_seconds": log.fit_seconds,
        "skipped": log.skipped,
        "sample_loss": None if log.losses is None else np.asarray(log.losses, np.float64).tolist(),
    }
    for i, g in enumerate(groups):
        # Backprop steps have no counts or traces: their group columns stay null.
        counts = log.counts[i] if i < len(log.counts) else None
        traces = log.traces[i] if i < len(log.traces) else None
        row[f"spread/{g}"] = float(counts.max() / counts.min()) if counts is not None else None
        traced = traces is not None and bool(np.isfinite(traces).all())
        row[f"variance_ratio/{g}"] = _finite(log.variance_ratio, i)
        row[f"mean_trace/{g}"] = float(np.mean(traces)) if traced else None
        row[f"counts/{g}"] = None if counts is None else np.asarray(counts, np.int64).tolist()
        row[f"trace/{g}"] = None if traces is None else np.asarray(traces, np.float64).tolist()
        for name in TELEMETRY:
            row[f"{name}/{g}"] = _finite(getattr(log, name), i)
        row[f"clipped/{g}"] = log.clipped[i] if i < len(log.clipped) else None
    for name in FARM_COUNTERS:
        row[f"farm/{name}"] = None if farm is None else int(farm[name])
    return row


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric and boolean (as 0 or 1: a chart's mean is the share of steps) non-null cells except
    ``step`` (the list columns stay in Parquet): what the TensorBoard, MLflow and W&B loggers log at the row's
    step."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)}


def read_metrics(path: str | Path) -> pa.Table:
    """The metrics table of a run, in step order.

    Raises:
        FileNotFoundError: nothing has been flushed to ``path`` yet.
    """
    path = Path(path)
    if path.is_dir() and not _parts(path):
        raise FileNotFoundError(f"{path}: no metrics flushed yet")
    return pq.read_table(path).sort_by("step")


def _parts(path: Path) -> list[Path]:
    return sorted(path.glob("part-*.parquet"))


def _write_part(table: pa.Table, path: Path) -> None:
    # A hidden temporary name until complete: pyarrow skips it when it reads the folder.
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class MetricsLog:
    """Accumulates step rows and flushes them to ``path``, a directory of Parquet parts.

    Args:
        path: the metrics directory (a new run replaces its parts; see ``resume_step``).
        groups: layer group names (one set of columns each).
        flush_every: rows per part.
        resume_step: keep the rows of an earlier run with ``step < resume_step`` (a resumed run).

    Raises:
        ValueError: ``path`` is a file, or holds the metrics of a run with other layer groups.
    """

    def __init__(self, path: str | Path, groups: list[str], flush_every: int = 50, resume_step: int | None = None):
        self.path = Path(path)
        self.groups = list(groups)
        self.schema = metrics_schema(self.groups)
        self.flush_every = flush_every
        self.rows: list[dict[str, Any]] = []
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path}: not a metrics directory; move the file or use another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        self.kept = 0
        """Rows of an earlier run kept (a resumed run's history)."""
        self._keep_before(0 if resume_step is None else resume_step)

    def _keep_before(self, step: int) -> None:
        """Drop the rows of earlier runs with ``step >= step`` (all of them for a new run)."""
        for part in _parts(self.path):
            table = pq.read_table(part)
            if table.schema.remove_metadata() != self.schema.remove_metadata():
                raise ValueError(
                    f"{part}: metrics of another run (other layer groups, or an older flops_ray's columns: "
                    f"{_column_change(table.schema, self.schema)}); move it or use another --out"
                )
            kept = table.filter(pc.less(table.column("step"), step))
            self.kept += kept.num_rows
            if kept.num_rows == 0:
                part.unlink()
            elif kept.num_rows < table.num_rows:
                _write_part(kept, part)

    def append(self, log: StepReport, farm: dict[str, int] | None = None) -> dict[str, Any]:
        """Add one step's row (:func:`metrics_row`; ``farm``: the farm's counters after the step); returns it."""
        row = metrics_row(log, self.groups, farm)
        self.rows.append(row)
        if len(self.rows) >= self.flush_every:
            self.flush()
        return row

    def flush(self) -> None:
        """Write the accumulated rows as one part, named after its first step."""
        if self.rows:
            table = pa.Table.from_pylist(self.rows, schema=self.schema)
            _write_part(table, self.path / f"part-{self.rows[0]['step']:09d}.parquet")
            self.rows = []

    def close(self) -> None:
        """Flush what is left."""
        self.flush()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
