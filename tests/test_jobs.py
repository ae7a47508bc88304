"""The main job as a script: a quick run writes every output, resumes, and reads Parquet data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flops_ray.data.convert import digits_to_parquet

# The main config runs on a local Ray the job starts: private HOME and RAY_TMPDIR, no auth (conftest.ray_env).
# Subprocesses, each starting its own Ray: `make test-fast` skips them (test_run.py is the fast path).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_env")]

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "finetune_vit.py"


def test_quick_run_then_resume(tmp_path, check_outputs, run_script):
    out = tmp_path / "run"
    stdout = run_script(str(JOB), "--quick", "--out", str(out), "--set", "steps=2").stdout
    assert "step     1 (2/2 done)" in stdout and "queries/s" in stdout
    assert "starting 2 replicas on Ray" in stdout and "2 of 2 replicas ready on cpu" in stdout
    summary = check_outputs(out, 2)
    assert summary["quick"] and summary["config"]["model"] == "digits_vit"
    # The farm's counters reach the summary: every task dispatched was accepted, none retried.
    farm = summary["farm"]
    assert farm["accepted"] == farm["dispatched"] > 0 and farm["retried"] == farm["restarts"] == 0

    stdout = run_script(str(JOB), "--quick", "--out", str(out), "--resume").stdout
    assert "resumed from" in stdout and "continuing at step 2" in stdout
    summary = check_outputs(out, 4)
    assert summary["resumed_from_step"] == 2 and summary["steps_run"] == 2


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    digits_to_parquet(root / "digits_train.parquet", "train")
    digits_to_parquet(root / "digits_test.parquet", "test")
    return root / "digits_train.parquet"


def test_quick_run_on_parquet(tmp_path, digits_parquet, check_outputs, run_script):
    """dataset: a Parquet path; the test split is the sibling file with train -> test in its name."""
    out = tmp_path / "pq"
    run_script(
        str(JOB),
        "--quick",
        "--out",
        str(out),
        "--set",
        f"data.dataset={digits_parquet}",
        "--set",
        "allocator.kind=equal",
    )
    summary = check_outputs(out, 4)
    assert summary["test_size"] == 360 and summary["train_size"] == 512  # quick reads at most 512 rows


def test_bad_option_fails_naming_it(tmp_path, run_script):
    proc = run_script(str(JOB), "--quick", "--out", str(tmp_path), "--set", "allocator.kind=best", ok=False)
    assert proc.returncode != 0 and "allocator.kind: must be one of" in proc.stderr


def _stop_at_step_2(args: list[str], out: Path) -> None:
    """Run the job with ``args`` into ``out`` and press Ctrl-C once step 2 is logged: it stops after that step."""
    import signal

    proc = subprocess.Popen([sys.executable, *args, "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step     2 (3/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=1800)[0]  # a deadline against a hang, never a verdict
    assert proc.returncode == 0 and "stopped by SIGINT" in rest, rest


def test_ctrl_c_then_resume_is_bit_identical(tmp_path, run_script):
    """The first Ctrl-C stops after the current step and saves it; --resume then ends where a straight run does."""
    import json

    from flops_ray.training.checkpoint import read_checkpoint

    args = [str(JOB), "--set", "model=digits_vit", "--set", "steps=150", "--set", "batch_size=8"]
    args += ["--set", "data.limit=256", "--set", "farm.backend=local", "--set", "job.log_every=1"]
    stopped = tmp_path / "stopped"
    _stop_at_step_2(args, stopped)
    summary = json.loads((stopped / "summary.json").read_text())
    assert 3 <= summary["steps"] < 150 and summary["stopped_by"] == "SIGINT"
    assert read_checkpoint(stopped / "checkpoint.safetensors").step == summary["steps"]

    run_script(*args, "--out", str(stopped), "--resume")
    run_script(*args, "--out", str(tmp_path / "straight"))
    resumed = read_checkpoint(stopped / "checkpoint.safetensors")
    straight = read_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    assert resumed.step == straight.step == 150
    assert all(torch.equal(resumed.model[k], v) for k, v in straight.model.items())


def test_farm_ctrl_c_then_resume_is_bit_identical(tmp_path, run_script):
    """On the Ray farm (the all-reduce): a run stopped by Ctrl-C and resumed ends with the parameters of a straight
    farm run, bit for bit (they once differed from step 2 on, by up to 1e-7: the all-reduce added in completion
    order)."""
    from flops_ray.training.checkpoint import read_checkpoint

    args = [str(JOB), "--set", "model=digits_vit", "--set", "steps=8", "--set", "batch_size=8"]
    args += ["--set", "data.limit=256", "--set", "job.log_every=1"]
    stopped = tmp_path / "stopped"
    _stop_at_step_2(args, stopped)
    assert read_checkpoint(stopped / "checkpoint.safetensors").step < 8

    assert "replicas ready" in run_script(*args, "--out", str(stopped), "--resume").stdout
    run_script(*args, "--out", str(tmp_path / "straight"))
    resumed = read_checkpoint(stopped / "checkpoint.safetensors")
    straight = read_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    assert resumed.step == straight.step == 8
    assert all(torch.equal(resumed.model[k], v) for k, v in straight.model.items())
