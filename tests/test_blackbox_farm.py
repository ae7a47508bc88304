"""Black boxes on a real local Ray: the farm gives the in-process result, and the function ships once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, TrainConfig
from flops_ray.data.arrays import ArrayDataset
from flops_ray.models.blackbox import BlackBox, BlackBoxError, ModuleLoss
from flops_ray.models.losses import cross_entropy
from flops_ray.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("ray_local")

STATE_BYTES = 4 << 20


class HeavyLoss(ModuleLoss):
    """A loss with 4 MiB of state, standing in for a model or a lookup table behind an API."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(
            torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)), cross_entropy
        )
        self.register_buffer("table", torch.zeros(STATE_BYTES // 4))


def _data() -> ArrayDataset:
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    return ArrayDataset(x.numpy(), (x[:, 0] > 0).long().numpy())


def _trainer(farm: FarmConfig) -> Trainer:
    loss = HeavyLoss()
    cfg = TrainConfig(
        groups=(BlackBox.group(0.01, 8),),
        estimator=EstimatorConfig(kind="es"),
        allocator=AllocatorConfig(kind="gaussian", gaussian_iters=3),
        batch_size=16,
        lr=1e-2,
        farm=farm,
    )
    return Trainer(cfg, BlackBox(loss, loss.theta0(), subspace=16), _data())


def test_black_box_on_the_farm_matches_in_process():
    with _trainer(FarmConfig()) as local:
        local.fit(3)
        want = local.model.theta()
    farm = FarmConfig(backend="ray", replicas=2, shard_cost=16, num_cpus_per_replica=1)
    with _trainer(farm) as remote:
        remote.step()
        counters = remote.backend.counters
        sent = counters.bytes_sent
        remote.fit(2)
        per_step = (counters.bytes_sent - sent) / 2
        got = remote.model.theta()
    assert torch.allclose(got, want, atol=1e-6)
    assert (want - _trainer(FarmConfig()).model.theta()).abs().max() > 1e-4
    # Parameters, batch and task messages only: the function's state went out once, with the replicas.
    assert per_step < STATE_BYTES / 50, per_step
    assert counters.retried == 0


def test_a_failed_step_on_the_farm_leaves_it_ready_for_the_next():
    """A loss that raises on a replica fails its step; the farm then steps on as if it never happened."""
    with _trainer(FarmConfig()) as local:
        local.fit(3)
        want = local.model.theta()
    farm = FarmConfig(backend="ray", replicas=2, shard_cost=4, num_cpus_per_replica=1)
    with _trainer(farm) as remote:
        remote.step()
        good = remote.train_set
        # Label 7 of a 2-class loss: every replica's cross-entropy raises on this batch.
        remote.train_set = ArrayDataset(good.x, np.full_like(good.y, 7))
        with pytest.raises(BlackBoxError, match="the loss function raised"):
            remote.step()
        assert remote.step_count == 1
        remote.train_set = good
        remote.fit(2)
        got = remote.model.theta()
    assert torch.allclose(got, want, atol=1e-6)
