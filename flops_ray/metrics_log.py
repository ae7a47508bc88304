"""Per-step training metrics appended to a Parquet file (one row per step, row groups of ``flush_every``).

Columns: ``step``, ``loss`` (mean clean loss), ``accuracy`` (null between evaluations), ``queries``,
``seconds``, ``queries_per_s``, ``allocator_seconds``, ``skipped``, ``sample_loss`` (list: per-sample clean losses),
and per layer group ``g``: ``spread/g`` (max/min query count), ``mean_trace/g``, ``counts/g`` and
``trace/g`` (lists: per-sample query counts and pilot trace estimates, for the trace-vs-loss plot).

>>> import tempfile, pathlib
>>> from flops_ray.trainer import StepLog
>>> path = pathlib.Path(tempfile.mkdtemp()) / "m.parquet"
>>> with MetricsLog(path, ["head"]) as log:
...     log.append(StepLog(0, 2.3, 8, 0.5, 0.01, [np.array([2, 6])], [np.array([1.0, 9.0])], np.array([2.0, 2.6])))
>>> read_metrics(path).column("spread/head").to_pylist()
[3.0]
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flops_ray.trainer import StepLog


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
        ("skipped", pa.int64()),
        ("sample_loss", pa.list_(pa.float64())),
    ]
    for g in groups:
        fields += [
            (f"spread/{g}", pa.float64()),
            (f"mean_trace/{g}", pa.float64()),
            (f"counts/{g}", pa.list_(pa.int64())),
            (f"trace/{g}", pa.list_(pa.float64())),
        ]
    return pa.schema(fields, metadata={"groups": "\n".join(groups)})


def read_metrics(path: str | Path) -> pa.Table:
    """The metrics table of a run."""
    return pq.read_table(path)


class MetricsLog:
    """Accumulates step rows and writes them to ``path`` as Parquet row groups.

    Args:
        path: the Parquet file (replaced; see ``resume_step``).
        groups: layer group names (one set of columns each).
        flush_every: rows per row group.
        resume_step: keep the rows of an existing file with ``step < resume_step`` (a resumed run).
    """

    def __init__(self, path: str | Path, groups: list[str], flush_every: int = 50, resume_step: int | None = None):
        self.path = Path(path)
        self.groups = list(groups)
        self.schema = metrics_schema(self.groups)
        self.flush_every = flush_every
        self.rows: list[dict[str, Any]] = []
        previous = self._previous(resume_step) if resume_step is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, self.schema)
        if previous is not None and previous.num_rows:
            self.writer.write_table(previous)

    def _previous(self, resume_step: int) -> pa.Table | None:
        if not self.path.exists():
            return None
        try:
            table = pq.read_table(self.path)
        except (pa.ArrowInvalid, OSError) as exc:
            # A run killed before close() leaves no Parquet footer: its rows are lost, training is not.
            warnings.warn(
                f"{self.path}: unreadable metrics of the previous run ({exc}); starting a new file", stacklevel=3
            )
            return None
        if table.schema.remove_metadata() != self.schema.remove_metadata():
            raise ValueError(f"{self.path}: metrics of another run (other layer groups); move it or use another --out")
        mask = pc.less(table.column("step"), resume_step)
        return table.filter(mask).replace_schema_metadata(self.schema.metadata)

    def append(self, log: StepLog) -> None:
        """Add one step's row."""
        row: dict[str, Any] = {
            "step": log.step,
            "loss": log.loss,
            "accuracy": log.accuracy,
            "queries": log.queries,
            "seconds": log.seconds,
            "queries_per_s": log.queries / log.seconds if log.seconds > 0 else None,
            "allocator_seconds": log.allocator_seconds,
            "skipped": log.skipped,
            "sample_loss": None if log.losses is None else np.asarray(log.losses, np.float64).tolist(),
        }
        for i, g in enumerate(self.groups):
            # Backprop steps have no counts or traces: their group columns stay null.
            counts = log.counts[i] if i < len(log.counts) else None
            traces = log.traces[i] if i < len(log.traces) else None
            row[f"spread/{g}"] = float(counts.max() / counts.min()) if counts is not None else None
            row[f"mean_trace/{g}"] = float(np.mean(traces)) if traces is not None else None
            row[f"counts/{g}"] = None if counts is None else np.asarray(counts, np.int64).tolist()
            row[f"trace/{g}"] = None if traces is None else np.asarray(traces, np.float64).tolist()
        self.rows.append(row)
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the accumulated rows as one row group."""
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        """Flush and write the Parquet footer (the file is readable only after this)."""
        if self.writer is not None:
            self.flush()
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
