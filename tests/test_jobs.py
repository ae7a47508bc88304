"""The main job as a script: a quick run writes every output, resumes, and reads Parquet data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flops_ray.checkpoint import read_checkpoint
from flops_ray.metrics_log import read_metrics
from flops_ray.parquet_data import digits_to_parquet

# The main config runs on a local Ray the job starts: private HOME and RAY_TMPDIR, no auth (conftest.ray_env).
pytestmark = pytest.mark.usefixtures("ray_env")

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "finetune_vit.py"


def _job(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(JOB), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def check_outputs(out: Path, steps: int) -> dict:
    """What every finetune_vit run leaves in its output directory (shared with the job-submit test)."""
    summary = json.loads((out / "finetune_vit.json").read_text())
    assert summary["steps"] == steps
    assert summary["queries"] > 0 and summary["wall_seconds"] > 0
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert summary["config"]["steps"] == steps
    table = read_metrics(out / "metrics.parquet")
    assert table.column("step").to_pylist() == list(range(steps))
    assert all(len(v) == summary["config"]["batch_size"] for v in table.column("sample_loss").to_pylist())
    assert read_checkpoint(out / "checkpoint.safetensors")[1]["step"] == steps
    for png in ("curves.png", "allocation.png", "trace_vs_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    return summary


def test_quick_run_then_resume(tmp_path):
    out = tmp_path / "run"
    stdout = _job("--quick", "--out", str(out), "--set", "steps=2")
    assert "step     2/2" in stdout and "queries/s" in stdout
    summary = check_outputs(out, 2)
    assert summary["quick"] and summary["config"]["model"] == "digits_vit"

    stdout = _job("--quick", "--out", str(out), "--resume")
    assert "resumed from" in stdout and "at step 2" in stdout
    summary = check_outputs(out, 4)
    assert summary["resumed_from_step"] == 2 and summary["steps_run"] == 2


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    digits_to_parquet(root / "digits_train.parquet", "train")
    digits_to_parquet(root / "digits_test.parquet", "test")
    return root / "digits_train.parquet"


def test_quick_run_on_parquet(tmp_path, digits_parquet):
    """dataset: a Parquet path; the test split is the sibling file with train -> test in its name."""
    out = tmp_path / "pq"
    _job("--quick", "--out", str(out), "--set", f"dataset={digits_parquet}", "--set", "allocator.kind=equal")
    summary = check_outputs(out, 4)
    assert summary["test_size"] == 360 and summary["train_size"] == 512  # quick reads at most 512 rows


def test_bad_option_fails_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(JOB), "--quick", "--out", str(tmp_path), "--set", "allocator.kind=best"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "allocator.kind: must be one of" in proc.stderr
