"""Builds the trainer's step object from its config: backprop, or a forward-only step on a backend."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flops_ray.allocation.allocators import Allocator
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import TrainConfig
from flops_ray.estimators import estimator_family
from flops_ray.models.groups import ResolvedGroup, resolve_groups
from flops_ray.models.losses import LossFn
from flops_ray.step.backend import Backend
from flops_ray.step.backprop import BackpropStep
from flops_ray.step.forward import ForwardStep
from flops_ray.step.interface import TrainStep

BackendFactory = Callable[[TrainConfig, nn.Module, LossFn], Backend]
"""Builds a backend whose replicas evaluate copies of the model."""


def trained_groups(cfg: TrainConfig, model: nn.Module) -> list[ResolvedGroup]:
    """``cfg``'s layer groups bound to ``model``: an estimator that perturbs linear outputs (LR) trains only
    their ``nn.Linear`` modules, backprop and the other estimators every parameter of the matched modules."""
    linear = not cfg.backprop and estimator_family(cfg.estimator, model).linear_outputs
    return resolve_groups(model, cfg.groups, linear)


def make_step(
    cfg: TrainConfig,
    model: nn.Module,
    groups: list[ResolvedGroup],
    optimizer: torch.optim.Optimizer,
    allocators: list[Allocator],
    memory: TraceMemory,
    loss_fn: LossFn,
    backend_factory: BackendFactory,
) -> TrainStep:
    """The step object ``cfg`` asks for: backprop through ``model`` stepping ``optimizer``, or forward-only on
    a backend whose replicas get copies of ``model``."""
    if cfg.backprop:
        return BackpropStep(model, groups, optimizer, loss_fn, cfg.grad_clip)
    return ForwardStep(
        backend_factory(cfg, model, loss_fn),
        groups=cfg.groups,
        sizes=[g.size for g in groups],
        widths=[g.noise_width for g in groups],
        estimator=cfg.estimator,
        allocator=cfg.allocator,
        allocators=allocators,
        memory=memory,
        shard_cost=cfg.farm.shard_cost,
        clean_shard=cfg.farm.clean_shard_size,
        root_seed=cfg.seed,
    )
