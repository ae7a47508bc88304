"""The MLflow logger: metrics at their steps, the config as parameters, checkpoint and summary as artifacts.

The tracking URI is ``job.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a file store in ``OUT/mlruns``
(MLflow keeps file stores in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; this logger allows one, as
the simplest store that needs no server). The run id goes in ``OUT/tracking.json``: a resumed run logs into it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flops_ray.training.tracking import missing_extra, read_tracking, record_tracking

PARAM_BATCH = 100
"""Parameters per ``log_batch`` call (MLflow's limit)."""


class MlflowLog:
    """One MLflow run of a training run.

    Args:
        out: the run's output directory.
        tracking_uri: ``job.tracking_uri`` (empty: the environment's, else ``OUT/mlruns``).
        experiment: the experiment's name (created when missing).
        params: the config as ``dotted.key -> value``.
        resume_step: the step a resumed run continues at (None: a new run).
    """

    def __init__(self, out: Path, tracking_uri: str, experiment: str, params: dict, resume_step: int | None):
        try:
            from mlflow.entities import Metric, Param, RunStatus
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise missing_extra("mlflow", exc) from exc
        self._metric, self._status = Metric, RunStatus
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        known = read_tracking(out).get("mlflow", {})
        if resume_step is not None and known.get("tracking_uri") == uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        record_tracking(out, "mlflow", {"tracking_uri": uri, "run_id": self.run_id})
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH])

    def log(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, files: list[Path], ok: bool) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        status = self._status.FINISHED if ok else self._status.KILLED
        self.client.set_terminated(self.run_id, self._status.to_string(status))
