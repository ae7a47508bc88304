"""A step's task lists as pure functions of the batch, the allocation and the shard size.

Plans never depend on the number of replicas, so every backend evaluates the same tasks and the
reduction in task order is the same everywhere (docs/DESIGN.md section 2).

>>> import numpy as np
>>> [len(t.items) for t in plan_clean(0, np.arange(5), shard_cost=2)]
[2, 2, 1]
"""

from __future__ import annotations

import numpy as np

from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.step.shards import plan_chunks

Chunk = tuple[ShardItem, ...]


def plan_clean(step: int, sample_ids: np.ndarray, shard_cost: int) -> list[ShardTask]:
    """Clean-pass tasks: ``shard_cost`` samples each, one unperturbed forward per sample."""
    b = len(sample_ids)
    return [
        ShardTask(
            kind=TaskKind.CLEAN,
            step=step,
            group=None,
            index=i,
            items=tuple(ShardItem(p, int(sample_ids[p]), 0, 1) for p in range(s, min(b, s + shard_cost))),
        )
        for i, s in enumerate(range(0, b, shard_cost))
    ]


def plan_pilot_chunks(
    sample_ids: np.ndarray, losses: np.ndarray, pilot: int, shard_cost: int, unit: int
) -> list[Chunk]:
    """Every sample's first ``pilot`` queries, in chunks that never split one sample's pilot.

    A sample's trace needs all its pilot draws in one task, so chunks hold whole pilots.
    """
    if not pilot:
        return []
    items = [ShardItem(p, int(sample_ids[p]), 0, pilot, float(losses[p])) for p in range(len(sample_ids))]
    return plan_chunks(items, max(pilot, shard_cost // pilot * pilot), unit)


def plan_pilot(step: int, groups: int, chunks: list[Chunk]) -> list[ShardTask]:
    """Pilot tasks of every group over the same ``chunks``."""
    return [
        ShardTask(kind=TaskKind.PILOT, step=step, group=g, index=i, items=c)
        for g in range(groups)
        for i, c in enumerate(chunks)
    ]


def plan_main(
    step: int,
    group: int,
    counts: np.ndarray,
    sample_ids: np.ndarray,
    losses: np.ndarray,
    pilot: int,
    shard_cost: int,
    unit: int,
    reuse_pilot: bool = True,
    traces: bool = False,
) -> list[ShardTask]:
    """One group's weighted tasks: the queries ``[0, A_j)``, or ``[pilot, A_j)`` after a pilot that is not reused.

    Args:
        step: the step counter.
        group: the layer group.
        counts: ``(B,)`` allocated queries ``A_j`` (the pilot included).
        sample_ids: ``(B,)`` dataset indices; losses: ``(B,)`` clean losses (the queries' baselines).
        pilot: pilot queries per sample.
        shard_cost: target forward passes per task.
        unit: queries per noise draw (a pair is never split).
        reuse_pilot: the pilot's queries enter the estimate (weights ``1 / (B A_j)``) and run here with the
            rest; otherwise a pilot round allocated from them, and the estimate averages the ``A_j - pilot``
            later queries.
        traces: the tasks also return per-item trace estimates (for the trace memory).
    """
    first = 0 if reuse_pilot else pilot
    weights = 1.0 / (len(counts) * (counts - first))
    items = [
        ShardItem(p, int(sample_ids[p]), first, int(counts[p]), float(losses[p]))
        for p in range(len(counts))
        if counts[p] > first
    ]
    return [
        ShardTask(
            kind=TaskKind.MAIN,
            step=step,
            group=group,
            index=i,
            items=c,
            weights=tuple(float(weights[it.pos]) for it in c),
            traces=traces,
        )
        for i, c in enumerate(plan_chunks(items, shard_cost, unit))
    ]
