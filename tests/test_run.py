"""The main job's logic in-process, fast: a quick run writes every output and resumes exactly.

The subprocess and Ray versions of the same path are in ``test_jobs.py`` (marked slow); this one keeps
an end-to-end check in ``make test-fast``.
"""

from __future__ import annotations

import dataclasses

from flops_ray.app.job_config import load_config
from flops_ray.app.run import train
from flops_ray.training.checkpoint import read_checkpoint


def test_quick_run_in_process_then_resume(tmp_path, check_outputs, capsys):
    cfg, job = load_config(None, ["farm.backend=local", "steps=2"])
    out = tmp_path / "run"
    summary = train(cfg, out, job, quick=True)
    assert summary["steps_run"] == 2 and check_outputs(out, 2) == summary
    assert summary["farm"] is None  # no Ray farm, no farm counters
    # Start-up lines come before step 0; progress lines name steps as the metrics do (from 0).
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "model digits_vit: 202,186 parameters",
        "data digits: 512 training samples, 360 test samples",
        "1 in-process replica on cpu",
    ], lines
    assert lines[3].startswith("step     0 (1/2 done)") and lines[4].startswith("step     1 (2/2 done)"), lines
    first = read_checkpoint(out / "checkpoint.safetensors")

    longer = dataclasses.replace(cfg, steps=4)
    resumed = train(longer, out, job, quick=True, resume=True)
    assert resumed["resumed_from_step"] == 2 and resumed["steps_run"] == 2
    check_outputs(out, 4)
    # The straight 4-step run ends where the resumed one does, bit for bit.
    straight = train(longer, tmp_path / "straight", job, quick=True)
    assert straight["final_test_accuracy"] == resumed["final_test_accuracy"]
    end = read_checkpoint(out / "checkpoint.safetensors").model
    assert all(
        (end[k] == v).all() for k, v in read_checkpoint(tmp_path / "straight" / "checkpoint.safetensors").model.items()
    )
    assert any((end[k] != v).any() for k, v in first.model.items())


def test_an_output_directory_belongs_to_one_run(tmp_path):
    """A live owner's lock refuses a second run at once, naming it; a dead owner's lock is taken over."""
    import json
    import os
    import socket
    import subprocess
    import sys

    import pytest

    from flops_ray.app.lock import LOCK, RunLockedError, owned

    cfg, job = load_config(None, ["farm.backend=local", "steps=1"])
    lock = tmp_path / LOCK
    with owned(tmp_path), pytest.raises(RunLockedError, match=rf"in use by the run of process {os.getpid()} on "):
        train(cfg, tmp_path, job, quick=True)
    assert not (tmp_path / "summary.json").exists(), "nothing was written"

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}))
    assert train(cfg, tmp_path, job, quick=True)["steps"] == 1
    assert not lock.exists(), "a finished run releases its directory"


def test_resume_says_when_metrics_rows_are_missing(tmp_path, capsys):
    import shutil

    cfg, job = load_config(None, ["farm.backend=local", "steps=2"])
    train(cfg, tmp_path, job, quick=True)
    shutil.rmtree(tmp_path / "metrics.parquet")
    train(dataclasses.replace(cfg, steps=3), tmp_path, job, quick=True, resume=True)
    assert "metrics.parquet holds 0 of the 2 rows before step 2" in capsys.readouterr().out


def test_checkpoints_every_n_steps(tmp_path):
    """``job.checkpoint_every``: after every N-th step the checkpoint on disk is that step's, rows flushed first."""
    from flops_ray.app.hooks import Checkpointer
    from flops_ray.app.run import build
    from flops_ray.training.metrics_log import MetricsLog, read_metrics

    cfg, _ = load_config(None, ["farm.backend=local", "model=digits_vit", "steps=3", "batch_size=8"])
    path, seen = tmp_path / "ck.safetensors", []
    with MetricsLog(tmp_path / "m.parquet", [g.name for g in cfg.groups], flush_every=100) as metrics:
        saver = Checkpointer(metrics, path, every=2, minutes=0)
        trainer = build(cfg)
        trainer.fit(
            hooks=[
                lambda _, r: metrics.append(r),
                saver,
                lambda t, r: seen.append(read_checkpoint(path).step if path.exists() else None),
            ]
        )
        assert seen == [None, 2, 2] and read_metrics(tmp_path / "m.parquet").num_rows == 2
