"""``flops-ray tune``: search specs, a quick search on a local Ray whose best config trains as is, and a search
interrupted and resumed with the same trials.

The searches are real: Ray Tune on a local Ray the command starts (private HOME and RAY_TMPDIR, conftest.ray_env),
each trial a run of its own.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flops_ray.config import ConfigError
from flops_ray.config.search import SearchSpec, parse_search

ROOT = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    script = shutil.which("flops-ray", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "flops_ray.app.cli"]


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("lr=loguniform:1e-4:1e-1", SearchSpec("lr", "loguniform", (1e-4, 1e-1))),
        ("groups.0.sigma=choice:1e-3,1e-2", SearchSpec("groups.0.sigma", "choice", (1e-3, 1e-2))),
        ("allocator.kind=grid:equal,gaussian", SearchSpec("allocator.kind", "grid", ("equal", "gaussian"))),
        ("batch_size=randint:16:64", SearchSpec("batch_size", "randint", (16, 64))),
    ],
)
def test_search_specs(spec, parsed):
    assert parse_search(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("lr", "expected KEY=KIND:ARGS"),
        ("lr=normal:0:1", "unknown kind 'normal'"),
        ("lr=loguniform:0:1", "loguniform needs LOW > 0"),
        ("lr=uniform:1:0", "needs numbers LOW < HIGH"),
    ],
)
def test_bad_search_spec_is_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_search(spec)


def test_a_searched_key_the_config_lacks_fails_before_ray():
    from flops_ray.app.tune import tune

    with pytest.raises(ConfigError, match=r"groups\.5"):
        tune(None, ["groups.5.sigma=choice:0.1,0.2"], trials=2)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")
def test_quick_search_writes_trials_and_a_best_config_that_trains(tmp_path):
    """4 trials over 2 keys, each with its own Ray farm (the default config), ASHA; best.yaml trains as is."""
    out = tmp_path / "tune"
    proc = subprocess.run([*_cli(), "tune", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials["trials"]) == 4
    assert all(set(t["values"]) == {"lr", "groups.0.sigma"} for t in trials["trials"])
    assert all("accuracy" in t["metrics"] for t in trials["trials"]), trials  # every trial reported
    best = max(trials["trials"], key=lambda t: t["metrics"]["accuracy"])
    assert trials["best"] == best["values"]
    for t in trials["trials"]:  # each trial is a run of its own, with its metrics
        assert (out / "trials" / t["trial_id"] / "metrics.parquet").is_dir()
    assert "replicas ready" in proc.stdout + proc.stderr, "trials run on their own Ray farm"
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["lr"] == pytest.approx(best["values"]["lr"])
    assert config["groups"][0]["sigma"] == best["values"]["groups.0.sigma"]
    assert (out / "best.yaml").read_text().startswith(f"# flops-ray train --config {out / 'best.yaml'}")
    run = subprocess.run(
        [*_cli(), "train", "--config", str(out / "best.yaml"), "--quick", "--out", str(tmp_path / "best")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads((tmp_path / "best" / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")
def test_an_interrupted_search_resumes_with_the_same_trials(tmp_path):
    """Ctrl-C once the first trial reports: Tune saves the search; --resume finishes the same trials."""
    out = tmp_path / "tune"
    args = [*_cli(), "tune", "--quick", "--out", str(out), "--set", "farm.backend=local", "--scheduler", "fifo"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step     3 (4/4 done)" in line:  # a trial has finished its run
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=1800)[0]  # a deadline against a hang, never a verdict
    assert proc.returncode != 0 and "--resume continues it" in rest, rest[-3000:]
    assert not (out / "best.yaml").exists()
    started = {p.name for p in (out / "trials").iterdir()}
    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 4 and started <= {t["trial_id"] for t in trials}
    assert all(t["metrics"].get("step") == 3 for t in trials), "fifo: every trial ran to its last evaluation"
    assert (out / "best.yaml").is_file()


def test_tune_help_explains_every_option(capsys):
    from flops_ray.app.cli import build_parsers, main

    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in build_parsers()["tune"]._actions:
        assert action.help, f"tune {action.option_strings or action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text
