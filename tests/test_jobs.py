"""The main job as a script: a quick run writes every output, resumes, and reads Parquet data."""

from __future__ import annotations

from pathlib import Path

import pytest

from flops_ray.parquet_data import digits_to_parquet

# The main config runs on a local Ray the job starts: private HOME and RAY_TMPDIR, no auth (conftest.ray_env).
# Subprocesses, each starting its own Ray: `make test-fast` skips them (test_run.py is the fast path).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_env")]

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "finetune_vit.py"


def test_quick_run_then_resume(tmp_path, check_outputs, run_script):
    out = tmp_path / "run"
    stdout = run_script(str(JOB), "--quick", "--out", str(out), "--set", "steps=2").stdout
    assert "step     2/2" in stdout and "queries/s" in stdout
    summary = check_outputs(out, 2)
    assert summary["quick"] and summary["config"]["model"] == "digits_vit"

    stdout = run_script(str(JOB), "--quick", "--out", str(out), "--resume").stdout
    assert "resumed from" in stdout and "at step 2" in stdout
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
