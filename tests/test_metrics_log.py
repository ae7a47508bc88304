"""The metrics log survives a killed run, resumes without duplicates, and refuses another run's metrics."""

from __future__ import annotations

import numpy as np
import pytest

from flops_ray.step.interface import StepReport
from flops_ray.training.metrics_log import MetricsLog, read_metrics


def _log(step: int) -> StepReport:
    return StepReport(
        step=step,
        loss=2.0 - step / 10,
        queries=8,
        seconds=0.5,
        allocator_seconds=0.01,
        counts=[np.array([2, 6])],
        traces=[np.array([1.0, 9.0])],
    )


def _steps(path) -> list[int]:
    return read_metrics(path).column("step").to_pylist()


def test_killed_run_keeps_flushed_rows_and_resume_replaces_the_rest(tmp_path):
    path = tmp_path / "metrics.parquet"
    log = MetricsLog(path, ["head"], flush_every=2)
    for step in range(5):
        log.append(_log(step))
    # Killed here: no close(). A half-written part of the next flush is hidden and ignored.
    (path / ".part-000000004.parquet.tmp").write_bytes(b"PAR1 truncated")
    assert _steps(path) == [0, 1, 2, 3]

    # Resumed from a checkpoint at step 3: rows >= 3 of the killed run go, the new ones come once.
    with MetricsLog(path, ["head"], flush_every=2, resume_step=3) as log:
        for step in range(3, 6):
            log.append(_log(step))
    assert _steps(path) == [0, 1, 2, 3, 4, 5]

    with MetricsLog(path, ["head"], flush_every=2) as log:  # a new run replaces the old one
        log.append(_log(0))
    assert _steps(path) == [0]


def test_a_pilot_without_traces_logs_a_null_mean_trace(tmp_path):
    path = tmp_path / "metrics.parquet"
    with MetricsLog(path, ["head"]) as log:
        log.append(
            StepReport(
                step=0,
                loss=2.0,
                queries=8,
                seconds=0.5,
                allocator_seconds=0.01,
                counts=[np.array([2, 2])],
                traces=[np.array([np.nan, np.nan])],
            )
        )
    assert read_metrics(path).column("mean_trace/head").to_pylist() == [None]


def test_other_runs_metrics_are_refused(tmp_path):
    path = tmp_path / "metrics.parquet"
    with MetricsLog(path, ["head"]) as log:
        log.append(_log(0))
    with pytest.raises(ValueError, match=r"other layer groups.*adds \['spread/top'"):
        MetricsLog(path, ["top", "head"], resume_step=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a metrics directory"):
        MetricsLog(tmp_path / "file", ["head"])
    with pytest.raises(FileNotFoundError, match="no metrics flushed yet"):
        read_metrics(MetricsLog(tmp_path / "empty", ["head"]).path)
