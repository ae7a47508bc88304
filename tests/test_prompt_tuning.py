"""``jobs/prompt_tuning.py --quick`` as a script: a black box tuned on the farm, compared across allocators."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# The job starts its own local Ray: private HOME and RAY_TMPDIR, loopback, no auth (conftest.ray_env).
pytestmark = pytest.mark.usefixtures("ray_env")

ROOT = Path(__file__).resolve().parents[1]


def test_quick_prompt_tuning_writes_its_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, "jobs/prompt_tuning.py", "--quick", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "out" / "prompt_tuning.json").read_text())
    assert set(result["accuracy_by_allocator"]) == {"gaussian", "equal"}
    assert result["accuracy"] == result["accuracy_by_allocator"]["gaussian"]
    for acc in (result["accuracy"], result["frozen_accuracy"], *result["accuracy_by_allocator"].values()):
        assert 0.0 <= acc <= 1.0
    assert [c["step"] for c in result["runs"]["equal"]["curve"]] == [2, 4]
    assert "gaussian  step    4/4" in proc.stdout
