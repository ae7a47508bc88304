"""TensorBoard, MLflow and W&B loggers: the same values at the same steps as ``metrics.parquet``, the config as
hyper-parameters, checkpoint and summary as artifacts, and a resumed run continuing the same logger run.

TensorBoard is read with tensorboard's own ``EventAccumulator``, MLflow with ``MlflowClient`` on the run's local
file store, W&B from its offline run folder.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from flops_ray.app.job_config import load_config
from flops_ray.app.run import train
from flops_ray.config import ConfigError
from flops_ray.training.loggers import Loggers, require_packages
from flops_ray.training.metrics_log import read_metrics
from flops_ray.training.tracking import TRACKING


def _parquet(out) -> dict[str, dict[int, float]]:
    """Every numeric metrics column as ``name -> {step: value}`` (null cells left out)."""
    table = read_metrics(out / "metrics.parquet")
    steps = table.column("step").to_pylist()
    found = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if name != "step" and any(isinstance(v, int | float) for v in values):
            found[name] = {s: float(v) for s, v in zip(steps, values) if v is not None}
    return found


def _same(logged: dict[str, dict[int, float]], parquet: dict[str, dict[int, float]], rel: float) -> None:
    assert set(logged) == {k for k, v in parquet.items() if v}, set(logged) ^ set(parquet)
    for name, by_step in parquet.items():
        assert set(logged.get(name, {})) == set(by_step), name
        for step, value in by_step.items():
            assert logged[name][step] == pytest.approx(value, rel=rel, abs=1e-300), (name, step)


def _run(tmp_path, loggers: str, steps: int, resume: bool = False):
    cfg, job = load_config(None, ["farm.backend=local", f"steps={steps}", f"job.loggers=[{loggers}]"])
    return train(cfg, tmp_path / "run", job, quick=True, resume=resume)


def test_tensorboard_holds_the_parquet_rows_and_a_resume_appends(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, "parquet, tensorboard", steps=2)
    _run(tmp_path, "tensorboard", steps=4, resume=True)
    out = tmp_path / "run"
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    parquet = _parquet(out)
    assert set(parquet["loss"]) == {0, 1, 2, 3}
    _same(logged, parquet, rel=1e-6)  # event files hold float32
    assert "hparams" in events.PluginTagToContent("hparams") or events.PluginTagToContent("hparams")


def test_mlflow_run_holds_the_parquet_rows_params_and_artifacts_and_a_resume_appends(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    _run(tmp_path, "mlflow", steps=2)
    out = tmp_path / "run"
    tracking = json.loads((out / TRACKING).read_text())["mlflow"]
    _run(tmp_path, "mlflow", steps=4, resume=True)
    assert json.loads((out / TRACKING).read_text())["mlflow"] == tracking, "the resumed run keeps its run id"
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    run = client.get_run(tracking["run_id"])
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    parquet = _parquet(out)
    logged = {
        name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in run.data.metrics
    }
    _same(logged, parquet, rel=1e-12)
    assert run.data.params["lr"] == str(load_config(None)[0].lr)
    assert run.data.params["groups.0.sigma"] and run.data.params["estimator.kind"] == "lr"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint.safetensors", "summary.json"} <= artifacts


def test_wandb_runs_offline_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path, "wandb", steps=2)
    out = tmp_path / "run"
    first = json.loads((out / TRACKING).read_text())["wandb"]
    _run(tmp_path, "wandb", steps=3, resume=True)
    again = json.loads((out / TRACKING).read_text())["wandb"]
    assert again["run_id"] == first["run_id"]
    runs = sorted((out / "wandb").glob(f"offline-run-*-{first['run_id']}"))
    assert len(runs) == 2, runs  # one offline folder per process, one run id (wandb sync merges them)
    assert all((r / f"run-{first['run_id']}.wandb").is_file() for r in runs)


def test_unknown_logger_is_named():
    with pytest.raises(ConfigError, match=r"job.loggers: unknown \['neptune'\]"):
        load_config(None, ["job.loggers=[neptune]"])


def test_a_missing_logger_package_names_its_extra(monkeypatch, tmp_path):
    import sys

    for name in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'flops_ray\[mlflow\]'"):
        require_packages(("parquet", "mlflow"))
    job = dataclasses.replace(load_config(None)[1], loggers=("mlflow",))
    with pytest.raises(ImportError, match=r"pip install 'flops_ray\[mlflow\]'"):
        Loggers(job, tmp_path, {})


def test_loggers_get_the_numeric_cells_of_a_row():
    from flops_ray.training.metrics_log import scalars

    row = {"step": 3, "loss": 1.5, "accuracy": None, "queries": 8, "sample_loss": [1.0], "farm/restarts": None}
    assert scalars(row) == {"loss": 1.5, "queries": 8.0}
