"""The driver actor: the step loop (allocator, reduction, optimizer) runs inside Ray, next to the farm.

A thin client (a laptop, a ``ray job submit`` entrypoint) starts it with :func:`start_driver` and calls
its methods; the client can disconnect between calls without stopping training.

    >>> from flops_ray.config import FarmConfig, TrainConfig
    >>> cfg = TrainConfig(farm=FarmConfig(backend="ray", workers=2))
    >>> driver = start_driver(cfg, model, train, test)  # doctest: +SKIP
    >>> logs = ray.get(driver.fit.remote(10))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses

import numpy as np
import ray
from ray.actor import ActorHandle
from torch import nn

from flops_ray.config import TrainConfig
from flops_ray.data import ArrayDataset
from flops_ray.engine import LossFn, cross_entropy
from flops_ray.farm.ray_init import init_ray
from flops_ray.trainer import StepLog, Trainer


# The driver mostly waits on replicas; reserving no CPU keeps every core for them.
@ray.remote(num_cpus=0, max_restarts=0)
class Driver:
    """A :class:`~flops_ray.trainer.Trainer` whose backend is the Ray farm, living in an actor.

    Args:
        cfg: the run's configuration (``farm.backend`` is forced to ``ray``).
        model: the model (master copy; replicas get their own from the object store).
        train: training data.
        test: held-out data (optional).
        loss_fn: per-sample loss.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train: ArrayDataset,
        test: ArrayDataset | None = None,
        loss_fn: LossFn = cross_entropy,
    ):
        cfg = cfg.replace(farm=dataclasses.replace(cfg.farm, backend="ray"))
        self.trainer = Trainer(cfg, model, train, test, loss_fn)

    def step(self) -> StepLog:
        return self.trainer.step()

    def fit(self, steps: int) -> list[StepLog]:
        return self.trainer.fit(steps)

    def evaluate(self) -> float:
        return self.trainer.evaluate()

    def get_params(self) -> np.ndarray:
        """``(P,)`` trainable parameters of the master model."""
        return self.trainer.engine.get_params().numpy()

    def close(self) -> None:
        """Release the replicas (the actor itself ends when the client drops its handle or kills it)."""
        self.trainer.close()


def start_driver(
    cfg: TrainConfig,
    model: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset | None = None,
    loss_fn: LossFn = cross_entropy,
) -> ActorHandle:
    """Start (or join) Ray as ``cfg.farm`` says and launch a :class:`Driver` actor there."""
    init_ray(cfg.farm)
    return Driver.remote(cfg, model, train, test, loss_fn)
