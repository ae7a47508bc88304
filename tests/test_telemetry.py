"""Gradient-quality telemetry: the SNR's variance is the variance repeated estimates of one batch show, the cosine
is that of consecutive estimates, and a run warns once when a group's estimate stays noise."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from flops_ray.app.hooks import NOISE_SNR, ClipWatch, NoiseWatch
from flops_ray.config import AllocatorConfig, EstimatorConfig, GroupConfig, TrainConfig
from flops_ray.models.factory import create_model
from flops_ray.step.interface import StepReport
from flops_ray.step.telemetry import cosine
from flops_ray.training.trainer import Trainer

HEAD = (GroupConfig("head", ("head",), sigma=0.1, queries_per_sample=8),)
REPS = 64


@pytest.fixture(scope="module")
def repeated(digits_splits):
    """``REPS`` estimates of step 0's batch with fresh noise (steps 1000+r draw noise no other step draws)."""
    cfg = TrainConfig(
        groups=HEAD,
        batch_size=16,
        steps=4,
        allocator=AllocatorConfig(kind="equal"),
        estimator=EstimatorConfig(telemetry_every=1),
    )
    model = create_model("digits_vit", 10, 8, cfg.seed)
    trainer = Trainer(cfg, model, *digits_splits)
    ids = np.arange(16)
    x, y = trainer.train_set.x[ids], trainer.train_set.y[ids]
    out = [trainer.train_step(1000 + r, x, y, ids) for r in range(REPS)]
    trainer.close()
    return [(reduced.grads[0], report) for reduced, report in out]


def test_snr_variance_is_the_variance_of_repeated_estimates(repeated):
    """``|g|^2 / snr`` is the step's ``tr Var(g)`` from its measured traces; the empirical trace of the covariance
    of ``REPS`` estimates has a relative standard deviation of at most ``sqrt(2 / (REPS - 1))`` (its value for a
    one-dimensional estimate), so the two agree within three of those."""
    grads = np.stack([g for g, _ in repeated])
    empirical = float(((grads - grads.mean(0)) ** 2).sum(1).mean()) * REPS / (REPS - 1)
    predicted = float(np.mean([np.sum(g**2) / r.snr[0] for g, r in repeated]))
    assert abs(predicted / empirical - 1) < 3 * math.sqrt(2 / (REPS - 1)), (predicted, empirical)
    assert all(np.isfinite(r.realised_variance_ratio[0]) for _, r in repeated)


def test_cosine_is_that_of_consecutive_estimates(repeated):
    assert math.isnan(repeated[0][1].cosine[0])
    for (before, _), (now, report) in itertools.pairwise(repeated):
        assert report.cosine[0] == pytest.approx(cosine(now, before), rel=1e-12)


def _report(step: int, snr: float, loss: float = 2.0) -> StepReport:
    return StepReport(step=step, loss=loss, counts=[np.full(4, 8)], snr=[snr])


def test_a_noisy_group_warns_once_naming_the_setting(capsys):
    watch = NoiseWatch(["head"], steps=3)
    for step, snr in enumerate([1.2, 5.0, 1.5, math.nan, 1.5, 1.5, 1.5]):
        watch(None, _report(step, snr))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines  # the noisy measured steps 2, 4 and 5 (3 is unmeasured) warn at step 5, once
    assert lines[0].startswith("warning: group head's gradient estimate has been noise for 3 measured steps (snr 1.50")
    assert "at step 5" in lines[0] and "likely setting: queries_per_sample (about 16 would reach snr 2)" in lines[0]


def test_a_rising_loss_names_the_learning_rate(capsys):
    watch = NoiseWatch(["head"], steps=2)
    watch(None, _report(0, 1.1, loss=2.0))
    watch(None, _report(1, 1.1, loss=2.5))
    assert "likely setting: lr" in capsys.readouterr().out


def test_unmeasured_snr_never_warns(capsys):
    watch = NoiseWatch(["head"], steps=1)
    watch(None, _report(0, float("nan")))
    watch(None, StepReport(step=1, loss=1.0))
    assert capsys.readouterr().out == "" and NOISE_SNR == 2.0


@pytest.mark.slow
def test_bench_telemetry_quick(tmp_path, run_script):
    """The predicted variance ratio of the default config is within 15% of the one 16 paired repetitions realise
    (their standard error is about 1%: the bound is loose by an order of magnitude)."""
    import json

    run_script("jobs/bench_telemetry.py", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "bench_telemetry.json").read_text())
    groups = result["checkpoints"][0]["groups"]
    assert [g["group"] for g in groups] == ["top", "head"]
    assert result["worst_relative_error"] < 0.15, groups


def _clip_report(step: int, clipped: list[bool], norms: list[float]) -> StepReport:
    return StepReport(step=step, loss=1.0, grad_norm=norms, clipped=clipped)


def test_a_run_almost_always_clipped_warns_once_per_group(capsys):
    """9 of the last 10 steps clipped warns (the median norm names the clip to exceed); 8 does not."""
    watch = ClipWatch(["top", "head"], grad_clip=1.0, window=10, share=0.9)
    for step in range(30):
        head = step % 10 != 0  # 9 in every 10
        top = step % 5 not in (0, 1)  # 6 in every 10
        watch(None, _clip_report(step, [top, head], [1.5, 3.0 if head else 0.5]))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "warning: group head's update was clipped in 9 of the last 10 steps (grad_clip 1, median norm 3): "
        "the clip, not the estimate, sets the step; raise grad_clip above the norm or lower lr"
    ]
    assert watch.summary() == "  clipped top 60% head 90%"


def test_steps_never_clipped_leave_the_progress_line_alone(capsys):
    watch = ClipWatch(["head"], grad_clip=20.0, window=2)
    for step in range(4):
        watch(None, _clip_report(step, [False], [3.0]))
    assert watch.summary() == "" and capsys.readouterr().out == ""


def test_reports_carry_the_norm_before_clipping(digits_splits):
    """The report's norm is the applied estimate's: one SGD step at lr 1 moves the group's parameters by the
    estimate itself (the first step's momentum is the gradient), unclipped by 0 and cut to the clip by a tiny one
    (reported as clipped); the default clip (an outlier guard) leaves the digits estimate alone. Backprop reports
    its exact gradient's norm the same way."""
    for backprop in (False, True):
        for grad_clip, want in ((0.0, False), (1e-3, True), (TrainConfig().grad_clip, False)):
            cfg = TrainConfig(
                groups=HEAD, batch_size=16, optimizer="sgd", lr=1.0, grad_clip=grad_clip, backprop=backprop
            )
            with Trainer(cfg, create_model("digits_vit", 10, 8, cfg.seed), *digits_splits) as trainer:
                before = trainer.get_params().copy()
                report = trainer.step()
                moved = float(np.linalg.norm(trainer.get_params() - before))
            assert report.clipped == [want], (backprop, grad_clip)
            assert 0.1 < report.grad_norm[0] < 20
            assert moved == pytest.approx(min(report.grad_norm[0], grad_clip or math.inf), rel=1e-4)
