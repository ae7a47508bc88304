"""The driver actor: the trainer's step loop (allocator, reduction, optimizer) inside Ray, next to the farm.

A thin client (a laptop, a ``ray job submit`` entrypoint) starts it with :func:`start_driver` and calls
the trainer's methods on the handle; the client can disconnect between calls without stopping training.

    >>> from flops_ray.config import FarmConfig, TrainConfig
    >>> cfg = TrainConfig(farm=FarmConfig(backend="ray", replicas=2))
    >>> driver = start_driver(cfg, model, train, test)  # doctest: +SKIP
    >>> reports = ray.get(driver.fit.remote(10))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses

from torch import nn

from flops_ray.config import TrainConfig
from flops_ray.data.arrays import ArrayDataset
from flops_ray.farm.hosted import Hosted, start_hosted
from flops_ray.models.losses import LossFn, cross_entropy
from flops_ray.training.trainer import Trainer


def start_driver(
    cfg: TrainConfig,
    model: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset | None = None,
    loss_fn: LossFn = cross_entropy,
) -> Hosted:
    """A :class:`~flops_ray.training.trainer.Trainer` on the Ray farm (``farm.backend`` forced to ``ray``), in an actor."""
    cfg = cfg.replace(farm=dataclasses.replace(cfg.farm, backend="ray"))
    return start_hosted(Trainer, cfg.farm, cfg, model, train, test, loss_fn)
