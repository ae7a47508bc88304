"""Forward precision: autocast forwards give the float32 estimate up to rounding; bfloat16 models train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flops_ray.config import EstimatorConfig, TrainConfig
from flops_ray.models.factory import create_model
from flops_ray.training.trainer import Trainer


def _update(train, kind: str, precision: str) -> np.ndarray:
    """One plain SGD step's parameter change: the gradient estimate itself (lr 1, no clipping)."""
    est = EstimatorConfig(kind=kind, precision=precision)
    cfg = TrainConfig(model="digits_vit", batch_size=16, optimizer="sgd", lr=1.0, grad_clip=0.0, estimator=est)
    with Trainer(cfg, create_model(cfg.model, 10, 8, cfg.seed), train) as trainer:
        before = trainer.get_params().copy()
        trainer.step()
        return trainer.get_params() - before


@pytest.mark.parametrize("kind", ["lr", "spsa", "es"])
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_autocast_forwards_give_the_float32_estimate_up_to_rounding(digits_splits, kind, precision):
    """Same seeds, same noise: only the forwards' rounding differs (bfloat16 keeps 8 mantissa bits, so a
    loss moves by ~0.4% of its size, a small fraction of what a perturbation moves it by)."""
    want, got = _update(digits_splits[0], kind, "float32"), _update(digits_splits[0], kind, precision)
    cosine = want @ got / (np.linalg.norm(want) * np.linalg.norm(got))
    assert not np.array_equal(want, got), "autocast changed nothing: the forwards did not run in low precision"
    assert cosine > 0.999, cosine


@pytest.mark.parametrize("backprop", [False, True])
def test_a_bfloat16_model_trains_and_evaluates(digits_splits, backprop):
    model = create_model("digits_vit", 10, 8, 0).to(torch.bfloat16)
    cfg = TrainConfig(model="digits_vit", batch_size=8, backprop=backprop)
    with Trainer(cfg, model, *digits_splits) as trainer:
        before = trainer.get_params().copy()
        report = trainer.step()
        assert np.isfinite(report.loss) and 0.0 <= trainer.evaluate() <= 1.0
        assert not np.array_equal(before, trainer.get_params())
    assert next(model.parameters()).dtype == torch.bfloat16
