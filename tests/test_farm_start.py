"""A farm that cannot start fails its Trainer cleanly: the error surfaces, and no Ray is left running."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import ray
import torch

from flops_ray import ArrayDataset, BlackBox, EstimatorConfig, FarmConfig, TrainConfig, Trainer

# The trainer starts (and must stop) its own local Ray: private HOME and RAY_TMPDIR, loopback, no auth.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_env")]


def test_a_model_that_cannot_ship_leaves_no_ray_behind():
    box = BlackBox(lambda thetas, x, y: (thetas * x).sum(-1), torch.zeros(3))
    box.guard = threading.Lock()  # cannot be pickled, so the model cannot reach the replicas
    cfg = TrainConfig(
        estimator=EstimatorConfig(kind="es"),
        groups=(box.group(sigma=0.1, queries_per_sample=4),),
        farm=FarmConfig(backend="ray", replicas=1),
    )
    data = ArrayDataset(np.ones((8, 3), np.float32), np.zeros(8, np.int64))
    assert not ray.is_initialized()
    with pytest.raises(TypeError, match="pickle"):
        Trainer(cfg, box, data)
    assert not ray.is_initialized()
