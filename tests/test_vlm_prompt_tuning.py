"""``jobs/vlm_prompt_tuning.py``: ``--quick`` end to end on the Ray farm (a subprocess), writing Table 2's rows."""

from __future__ import annotations

import json

import pytest

# The job starts its own local Ray: private HOME and RAY_TMPDIR, loopback, no auth (conftest.ray_env).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_env")]

METHODS = {"ops_lr", "ops_spsa", "lr", "spsa", "manual"}


def test_quick_run_writes_every_row(tmp_path, run_script):
    """``--quick`` is a plumbing check (a barely pretrained stand-in, one short pass): no accuracy is asserted,
    only that every method ran on every dataset for every seed, on the farm, and the rows summarise the runs."""
    out = tmp_path / "out"
    proc = run_script("jobs/vlm_prompt_tuning.py", "--quick", "--out", str(out), "--seeds", "0", "1")
    result = json.loads((out / "vlm_prompt_tuning.json").read_text())
    assert "--quick is a plumbing check" in proc.stdout and result["quick"] is True
    assert result["config"]["backend"] == "ray" and result["seeds"] == [0, 1]
    assert set(result["rows"]) == METHODS
    datasets = {"digits", "places", "low_res_places"}
    for method, by_task in result["rows"].items():
        assert set(by_task) == datasets
        for name, row in by_task.items():
            assert set(row) == {"mean", "sd", "seeds"} and len(row["seeds"]) == 2
            runs = [r["accuracy"] for r in result["runs"] if (r["method"], r["dataset"]) == (method, name)]
            assert method == "manual" or row["seeds"] == runs
            assert row["mean"] == pytest.approx(sum(row["seeds"]) / 2) and 0 <= row["mean"] <= 1
    # The stand-in was written and loaded back from its folder, as a hub model's would be.
    assert (out / "standin" / "config.json").is_file() and (out / "standin" / "tokenizer.json").is_file()
    assert "stand-in CLIP: 20 contrastive steps" in proc.stdout
