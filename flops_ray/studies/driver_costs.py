"""The driver's and the replay's costs per step, measured in-process for the step-time model at ViT-B/16's shape."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from flops_ray.allocation.allocators import AllocationFeatures, create_allocator
from flops_ray.allocation.gaussian import GaussianAllocator
from flops_ray.config import FarmConfig, TrainConfig
from flops_ray.estimators import RowPlan
from flops_ray.estimators.noise_layout import NoiseLayout
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models.factory import create_model
from flops_ray.replica.replay import replay_gradients
from flops_ray.step.checks import least_queries
from flops_ray.studies.timed_backend import timed_steps
from flops_ray.studies.timing import best_seconds, seconds

VIT_B_MAIN_SHARD = 32
"""Forwards per main shard of the ViT-B step for the driver's planning cost: 5 shards per GPU at 64 GPUs, more
tasks to plan than the sizes the model picks there (conservative)."""

VIT_B_BLOCKS = (("blocks.0.*",), ("blocks.1.*",), ("blocks.[2-3].*",), ("head",))
"""The ViT-B/16 config's four layer groups, mapped onto the digits ViT's four blocks and head."""


def vit_b_driver_seconds(vit: TrainConfig, seed: int, reps: int) -> tuple[float, float]:
    """Driver seconds per step of the ViT-B/16 config ``vit``'s step (batch, groups, queries, estimator,
    allocator; main shards of the 64-GPU size), measured here on the digits ViT: planning and allocation
    depend on the step's shape, not on the model, whose forwards are timed apart and left out, except for
    the batch's cosine distances, whose cost at ViT-B's embedding width is measured apart and added.

    Returns:
        The driver's own seconds, and the allocator fit's alone on one thread (:func:`fit_seconds`, best of ``reps``).
    """
    groups = tuple(dataclasses.replace(g, modules=m) for g, m in zip(vit.groups, VIT_B_BLOCKS))
    cfg = TrainConfig(
        model="digits_vit",
        batch_size=vit.batch_size,
        groups=groups,
        estimator=vit.estimator,
        allocator=vit.allocator,
        farm=FarmConfig(shard_cost=VIT_B_MAIN_SHARD),
        seed=seed,
    )
    t = timed_steps(cfg, 2, seed)
    narrow = create_model("digits_vit", 10, 8, seed).embed_dim
    return t.driver_s + wider_embeddings_seconds(cfg.batch_size, narrow, 768), fit_seconds(cfg, reps)


def wider_embeddings_seconds(b: int, narrow: int, wide: int, reps: int = 50) -> float:
    """Seconds the step's one ``(B, B)`` cosine-distance matrix (the driver's only work that grows with the
    model's width) costs more from ``(B, wide)`` embeddings than from ``(B, narrow)`` ones (best of ``reps``)."""

    def once(e: torch.Tensor) -> float:
        fresh = e.clone()  # a new tensor: the last batch's matrix is not reused
        return seconds(lambda: GaussianAllocator.distances(fresh))

    def best(width: int) -> float:
        e = torch.randn(b, width, dtype=torch.float64)
        return min(once(e) for _ in range(reps))

    return max(0.0, best(wide) - best(narrow))


def fit_seconds(cfg: TrainConfig, reps: int, width: int = 768) -> float:
    """Seconds of one step's allocator fit under ``cfg`` (every group's), alone on one thread: on a farm it runs
    in a thread of the driver beside a dispatch loop that mostly waits on Ray, not beside an in-process engine
    as in :func:`~flops_ray.studies.timed_backend.timed_steps`. Its cost depends on the batch, the groups and the
    allocator's settings, not on the features' values (``width``: the embeddings', ViT-B's by default). Best of
    ``reps``, each from fresh allocators."""
    gen = torch.Generator().manual_seed(cfg.seed)
    b = cfg.batch_size
    feats = AllocationFeatures(
        torch.rand(b, generator=gen, dtype=torch.float64) + 0.1,
        torch.rand(b, generator=gen, dtype=torch.float64),
        torch.randn(b, width, generator=gen, dtype=torch.float64),
    )
    minimum = least_queries(cfg.estimator, cfg.allocator)

    def fit_once() -> float:
        allocators = [create_allocator(cfg.allocator) for _ in cfg.groups]
        return seconds(
            lambda: [a.update(feats, g.queries_per_sample * b, minimum, gen) for a, g in zip(allocators, cfg.groups)]
        )

    return min(fit_once() for _ in range(reps))


def replay_seconds_per_number(batch_size: int, queries_per_sample: int, size: int, seed: int, reps: int) -> float:
    """Seconds per noise number regenerated and weighed by :func:`~flops_ray.replica.replay.replay_gradients`
    (one thread): a main shard of ``batch_size`` samples at ``queries_per_sample`` each, a group of ``size``."""
    items = tuple(ShardItem(j, j, 0, queries_per_sample) for j in range(batch_size))
    task = ShardTask(TaskKind.MAIN, 0, 0, 0, items, weights=(1.0,) * len(items))
    draws = len(RowPlan.of(task, 1, seed, torch.device("cpu")).keys)
    coefs = np.ones(draws, dtype=np.float32)
    cpu = torch.device("cpu")
    best = best_seconds(reps, lambda: replay_gradients([task], [coefs], [NoiseLayout.dense(size)], 1, seed, cpu))
    return best / (draws * size)
