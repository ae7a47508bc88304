"""``jobs/prompt_tuning.py --quick`` as a script: a black box tuned on the farm, compared across allocators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# The job starts its own local Ray: private HOME and RAY_TMPDIR, loopback, no auth (conftest.ray_env).
# The prompt-tuning job in a subprocess (pretraining included): slow.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_env")]

ROOT = Path(__file__).resolve().parents[1]


def test_quick_prompt_tuning_writes_its_results(tmp_path, run_script):
    """``--quick`` is a plumbing check: 4 steps cannot move a prompt, so no accuracy gain is asserted."""
    proc = run_script("jobs/prompt_tuning.py", "--quick", "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "prompt_tuning.json").read_text())
    assert set(result["accuracy_by_allocator"]) == {"gaussian", "equal"}
    assert result["accuracy"] == result["accuracy_by_allocator"]["gaussian"]
    for kind, run in result["runs"].items():
        # Each allocator's headline is its last evaluation, and the curve is what the job printed.
        assert result["accuracy_by_allocator"][kind] == run["curve"][-1]["accuracy"]
        assert f"{kind:9s} step    4/4  loss {run['curve'][-1]['loss']:.3f}  acc {run['accuracy']:.3f}" in proc.stdout
    assert [c["step"] for c in result["runs"]["equal"]["curve"]] == [2, 4]
