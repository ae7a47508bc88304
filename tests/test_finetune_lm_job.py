"""The causal LM job as a script: a quick run writes the stand-in, trains it on a Ray farm and writes its summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

# The default config runs on a local Ray the job starts: private HOME and RAY_TMPDIR, no auth (conftest.ray_env).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_env")]

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "finetune_lm.py"


def test_quick_run_writes_the_standin_and_the_summary(tmp_path, run_script):
    out = tmp_path / "run"
    stdout = run_script(str(JOB), "--quick", "--out", str(out)).stdout
    assert "wrote the stand-in LM" in stdout and "2 of 2 replicas ready on cpu" in stdout
    assert (out / "standin" / "model" / "config.json").is_file() and (out / "standin" / "test.jsonl").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert {"initial_accuracy", "accuracy", "initial_loss", "loss"} <= summary.keys()
    assert all(isinstance(summary[k], float) for k in ("initial_accuracy", "accuracy", "initial_loss", "loss"))
    # The run trained the stand-in's files, on its default groups: the last block's output projections.
    config = summary["config"]
    assert config["model"] == f"hf:{out / 'standin' / 'model'}"
    assert config["data"]["dataset"] == str(out / "standin" / "train.jsonl")
    assert [g["name"] for g in config["groups"]] == ["mlp", "attn"] and summary["steps"] == 4


def test_seed_names_the_standin_and_the_run(tmp_path, run_script):
    out = tmp_path / "seeded"
    run_script(str(JOB), "--quick", "--out", str(out), "--seed", "3", "--set", "farm.backend=local")
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 3
