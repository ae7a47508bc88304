"""In-process replicas as the studies build them: a query engine on a device, or a whole in-process backend.

The one place where a study constructs replicas itself (training runs get theirs from the trainer); when
their construction changes, only this file follows it.
"""

from __future__ import annotations

import torch
from torch import nn

from flops_ray.config import EstimatorConfig, GroupConfig
from flops_ray.models.losses import LossFn, cross_entropy
from flops_ray.replica.engine import QueryEngine
from flops_ray.replica.replica import Replica, ReplicaSpec
from flops_ray.step.local_backend import LocalBackend


def query_engine(
    model: nn.Module,
    groups: tuple[GroupConfig, ...],
    estimator: EstimatorConfig,
    seed: int,
    device: str | torch.device = "cpu",
    loss_fn: LossFn = cross_entropy,
) -> QueryEngine:
    """An engine evaluating shard tasks of ``groups`` on ``model`` (which it moves to ``device`` and owns) with the
    per-sample loss ``loss_fn``."""
    return QueryEngine(model, groups, estimator, seed, loss_fn, device)


def local_backend(
    model: nn.Module, groups: tuple[GroupConfig, ...], estimator: EstimatorConfig, seed: int
) -> LocalBackend:
    """The in-process backend over one replica of ``model`` (which it owns), with the default update rule."""
    return LocalBackend(Replica(model, ReplicaSpec(groups, estimator, seed)))
