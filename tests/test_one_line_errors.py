"""Every way a user's command or job fails ends in one line, ``error: ...``, exit 2 (``--debug``: the traceback);
a second Ctrl-C ends quietly after the checkpoint."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flops_ray.app.errors import error_line, reported
from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, TrainConfig
from flops_ray.data.arrays import ArrayDataset
from flops_ray.models.blackbox import BlackBox, BlackBoxShapeError, ModuleLoss
from flops_ray.models.losses import cross_entropy
from flops_ray.studies.job_cli import job_parser, run_main
from flops_ray.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
HANG = 1800
"""Seconds after which a job is taken to hang: a deadline that stops a hang, never a verdict."""
TAIL = " (--debug shows the traceback)"


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("job", ["finetune_vit.py", "finetune_lm.py"])
def test_the_training_jobs_fail_in_one_line(job):
    args = [sys.executable, str(ROOT / "jobs" / job), "--set", "steps=ten"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=HANG, cwd=ROOT)
    assert proc.returncode == 2
    assert _one_line(proc.stderr) == (
        "error: steps: must be an integer, got 'ten' (ConfigError; --debug shows the traceback)\n"
    )
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, timeout=HANG, cwd=ROOT)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_the_study_jobs_share_the_handler(monkeypatch, capsys):
    parser = job_parser("a job", "x", "small")

    def fails(args) -> None:
        raise FileNotFoundError(f"no data under {args.out}")

    monkeypatch.setattr(sys, "argv", ["job.py", "--out", "somewhere"])
    with pytest.raises(SystemExit) as ended:
        run_main(parser, fails)
    assert ended.value.code == 2
    assert _one_line(capsys.readouterr().err) == (
        "error: no data under somewhere (FileNotFoundError; --debug shows the traceback)\n"
    )
    monkeypatch.setattr(sys, "argv", ["job.py", "--debug"])
    with pytest.raises(FileNotFoundError):
        run_main(parser, fails)
    monkeypatch.setattr(sys, "argv", ["job.py"])
    with pytest.raises(SystemExit) as ended:
        run_main(parser, lambda args: {"a summary": 1})
    assert ended.value.code == 0


def test_a_message_is_one_line_and_bounded():
    assert error_line(ValueError("first\n  second\n\x1b[31mred\x1b[0m")) == (
        "error: first second red (ValueError; --debug shows the traceback)"
    )
    assert error_line(KeyError()) == "error: KeyError" + TAIL
    assert len(error_line(ValueError("x" * 10**6))) < 2100


def test_ctrl_c_is_quiet(capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt

    assert reported(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"


def _box_trainer(fn, farm: FarmConfig) -> Trainer:
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        groups=(BlackBox.group(0.01, 4),),
        estimator=EstimatorConfig(kind="es"),
        allocator=AllocatorConfig(kind="equal"),
        batch_size=8,
        farm=farm,
    )
    return Trainer(cfg, BlackBox(fn, torch.zeros(12), subspace=4), ArrayDataset(x.numpy(), np.full(32, 7)))


def _module_loss() -> ModuleLoss:
    torch.manual_seed(0)
    return ModuleLoss(torch.nn.Linear(5, 2), cross_entropy)


@pytest.mark.usefixtures("ray_local")
def test_an_error_raised_on_a_replica_names_the_users_exception(capsys):
    """Label 7 of a 2-class loss: cross-entropy raises on every replica; the line is its message, not Ray's stack."""
    loss = _module_loss()
    farm = FarmConfig(backend="ray", replicas=2, shard_cost=4, num_cpus_per_replica=1)
    with _box_trainer(loss, farm) as trainer:
        assert reported(trainer.step) == 2
    err = _one_line(capsys.readouterr().err)
    # The farm may name the shard and its samples first.
    assert re.fullmatch(
        r"error: (shard .*: )?the loss function raised IndexError: Target 7 is out of bounds\. "
        r"\(BlackBoxError; --debug shows the traceback\)\n",
        err,
    ), err


def test_a_black_box_returning_strings_is_named():
    strings = _box_trainer(lambda thetas, x, y: ["0.5"] * len(thetas), FarmConfig())
    with strings as trainer, pytest.raises(BlackBoxShapeError) as err:
        trainer.step()
    shown = "['0.5', '0.5', '0.5', '0.5', '0.5', '0.5', ...]"
    assert f"the loss function returned list {shown}, not (8,) " in str(err.value)
    assert str(err.value).endswith("floating-point losses (torch.as_tensor: too many dimensions 'str')")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")
def test_a_second_ctrl_c_exits_quietly_after_the_checkpoint(tmp_path):
    from flops_ray.training.checkpoint import read_checkpoint

    args = [str(ROOT / "jobs" / "finetune_vit.py"), "--set", "model=digits_vit", "--set", "steps=10000"]
    args += ["--set", "batch_size=64", "--set", "farm.backend=local", "--set", "job.log_every=1"]
    proc = subprocess.Popen(
        [sys.executable, *args, "--out", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("step     2 ("):
            proc.send_signal(signal.SIGINT)
            break
    # The first signal's notice, then the second signal while the step still runs.
    assert proc.stderr.readline().startswith("SIGINT: stopping after this step")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 130, out + err
    assert err == "interrupted\n", err
    assert f"saved {tmp_path / 'checkpoint.safetensors'}" in out
    assert read_checkpoint(tmp_path / "checkpoint.safetensors").step >= 3


FAILING_BOX = """
import sys, numpy as np, torch
from flops_ray.app.errors import reported
from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, TrainConfig
from flops_ray.data.arrays import ArrayDataset
from flops_ray.models.blackbox import BlackBox

def loss(thetas, x, y):
    raise ValueError("the API refused the key")

cfg = TrainConfig(
    groups=(BlackBox.group(0.01, 4),), estimator=EstimatorConfig(kind="es"), allocator=AllocatorConfig(kind="equal"),
    batch_size=8, farm=FarmConfig(backend="ray", replicas=2, shard_cost=4, num_cpus_per_replica=1),
)
x = np.zeros((16, 5), np.float32)
def run():
    with Trainer(cfg, BlackBox(loss, torch.zeros(5)), ArrayDataset(x, np.zeros(16, np.int64))) as trainer:
        trainer.step()
from flops_ray.training.trainer import Trainer
sys.exit(reported(run))
"""


@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")
def test_a_replicas_error_is_the_last_line_of_the_process():
    """The whole process, Ray's start and shutdown included: no stack, no 'Unhandled error' of dropped calls."""
    proc = subprocess.run([sys.executable, "-c", FAILING_BOX], capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Unhandled error" not in proc.stderr, proc.stderr
    assert re.fullmatch(
        r"error: (shard .*: )?the loss function raised ValueError: the API refused the key "
        r"\(BlackBoxError; --debug shows the traceback\)",
        proc.stderr.splitlines()[-1],
    ), proc.stderr
