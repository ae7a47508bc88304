"""``jobs/prompt_tuning.py``: its premise (the frozen model follows both prompts), the premise check, and
black-box tuning that beats the frozen model; ``--quick`` as a script on the farm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# The job starts its own local Ray: private HOME and RAY_TMPDIR, loopback, no auth (conftest.ray_env).
# The prompt-tuning job in a subprocess, or its backprop pretraining in process (~30 s): slow.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_env")]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def job(monkeypatch):
    """The job module, imported from ``jobs/``."""
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import prompt_tuning

    return prompt_tuning


def test_quick_prompt_tuning_writes_its_results(tmp_path, run_script):
    """``--quick`` is a plumbing check: 4 steps cannot move a prompt, so no accuracy gain is asserted."""
    proc = run_script("jobs/prompt_tuning.py", "--quick", "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "--quick is a plumbing check" in proc.stdout and result["quick"] is True
    assert result["premise"]["threshold"] == 0.0 and result["premise"]["pretrain_steps"] == 60
    assert result["frozen_accuracy"] == result["premise"]["test"][0][1]
    assert set(result["accuracy_by_allocator"]) == {"gaussian", "equal"}
    assert result["accuracy"] == result["accuracy_by_allocator"]["gaussian"]
    for kind, run in result["runs"].items():
        # Each allocator's headline is its last evaluation, and the curve is what the job printed.
        assert result["accuracy_by_allocator"][kind] == run["curve"][-1]["accuracy"]
        assert f"{kind:9s} step    4/4  loss {run['curve'][-1]['loss']:.3f}  acc {run['accuracy']:.3f}" in proc.stdout
    assert [c["step"] for c in result["runs"]["equal"]["curve"]] == [2, 4]


def test_the_full_job_stops_when_its_premise_is_not_met(tmp_path, run_script):
    """The full job's premise check on a tiny pretraining budget: a clear error naming the figures, no results."""
    out = tmp_path / "out"
    proc = run_script(
        "jobs/prompt_tuning.py", "--out", str(out), "--backend", "local", "--pretrain-max-steps", "100", ok=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: after 100 pretraining steps the frozen model follows its prompts" in proc.stderr
    assert "below the premise threshold 0.85" in proc.stderr
    assert "pretrain step   100" in proc.stdout
    assert not (out / "summary.json").exists()


def test_frozen_model_follows_its_prompts_and_tuning_beats_it(job):
    """The check that would have caught a frozen model that ignores its prompts: the default prompt must do
    its own labelling (not the hidden one), and a short black-box search must beat it by a wide margin."""
    cfg = job.PromptConfig(backend="local", steps=60, allocators=("equal",))
    model, prompts, premise = job.pretrain_prompt_follower(cfg)
    assert premise["pretrain_steps"] < cfg.pretrain_max_steps
    assert min(premise["held_out"][0][0], premise["held_out"][1][1]) >= cfg.follow_threshold
    test = job.digits("test")
    (own, frozen), (_, lost) = job.follow_matrix(model, prompts, test)
    assert own >= 0.8 and lost >= 0.8  # on unseen data too, each prompt gets its labelling
    assert frozen <= 0.15  # the default prompt answers the other labelling: a lot to fix
    tuned = job.tune(cfg, model, prompts[0], "equal")
    assert tuned["accuracy"] >= frozen + 0.3
