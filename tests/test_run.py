"""The main job's logic in-process, fast: a quick run writes every output and resumes exactly.

The subprocess and Ray versions of the same path are in ``test_jobs.py`` (marked slow); this one keeps
an end-to-end check in ``make test-fast``.
"""

from __future__ import annotations

import dataclasses

from flops_ray.checkpoint import read_checkpoint
from flops_ray.job_config import load_config
from flops_ray.run import train


def test_quick_run_in_process_then_resume(tmp_path, check_outputs):
    cfg, job = load_config(None, ["farm.backend=local", "steps=2"])
    out = tmp_path / "run"
    summary = train(cfg, out, job, quick=True)
    assert summary["steps_run"] == 2 and check_outputs(out, 2) == summary
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
