"""Main shard tasks made to order, without a step's plan: the farm's timings run them at chosen per-sample counts."""

from __future__ import annotations

import numpy as np

from flops_ray.config import TrainConfig
from flops_ray.estimators import queries_per_draw
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.step.shards import plan_chunks


def pair_tasks(calls: int, samples: int) -> list[ShardTask]:
    """``calls`` of the smallest main tasks: one antithetic pair of one sample each (samples taken in turn)."""
    return [ShardTask(TaskKind.MAIN, 0, 0, i, (ShardItem(i % samples, i, 0, 2),), weights=(1.0,)) for i in range(calls)]


def main_tasks(cfg: TrainConfig, ids: np.ndarray, counts: np.ndarray, per_sample: bool) -> list[ShardTask]:
    """Main shards of every group of ``cfg`` for per-sample ``counts``; ``per_sample`` cuts each sample separately."""
    unit = queries_per_draw(cfg.estimator)
    items = [ShardItem(j, int(ids[j]), 0, int(counts[j]), 2.3) for j in range(len(ids))]
    chunks = (
        [c for it in items for c in plan_chunks([it], cfg.farm.shard_cost, unit)]
        if per_sample
        else plan_chunks(items, cfg.farm.shard_cost, unit)
    )
    w = 1.0 / (len(ids) * float(np.mean(counts)))
    return [
        ShardTask(kind=TaskKind.MAIN, step=0, group=g, index=i, items=c, weights=tuple(w for _ in c))
        for g in range(len(cfg.groups))
        for i, c in enumerate(chunks)
    ]


def spread_counts(cfg: TrainConfig, queries: int, spread: float) -> np.ndarray:
    """``(B,)`` per-sample counts from ``queries/sqrt(spread)`` to ``queries*sqrt(spread)`` (geometric), whole
    draws of ``cfg``'s estimator, shuffled by ``cfg.seed``."""
    unit = queries_per_draw(cfg.estimator)
    counts = np.geomspace(queries / np.sqrt(spread), queries * np.sqrt(spread), cfg.batch_size)
    counts = np.maximum(unit, np.round(counts / unit) * unit).astype(int)
    return np.random.default_rng(cfg.seed).permutation(counts)
