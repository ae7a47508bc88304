"""Shard planning: cut per-sample query ranges into chunks of about equal cost (pure function).

The plan depends only on the ranges and the target cost, never on the number of replicas, so every
backend evaluates the same shards and the reduction is identical.

>>> from flops_ray.messages import ShardItem
>>> chunks = plan_chunks([ShardItem(0, 10, 0, 12), ShardItem(1, 11, 0, 4)], max_cost=8, unit=2)
>>> [[(it.pos, it.q0, it.q1) for it in c] for c in chunks]
[[(0, 0, 8)], [(0, 8, 12), (1, 0, 4)]]
"""

from __future__ import annotations

from flops_ray.messages import ShardItem


def plan_chunks(items: list[ShardItem], max_cost: int, unit: int) -> list[tuple[ShardItem, ...]]:
    """Greedy in sample order: split ranges longer than ``max_cost`` and pack short ones together.

    Args:
        items: per-sample ranges ``[q0, q1)``, each aligned to ``unit``.
        max_cost: most forward passes per chunk (rounded down to a multiple of ``unit``, at least one unit).
        unit: queries per noise draw; a pair is never split across chunks.

    Returns:
        Chunks covering every query exactly once, each of cost ``<= max_cost``.
    """
    cap = max(unit, max_cost - max_cost % unit)
    chunks: list[tuple[ShardItem, ...]] = []
    current: list[ShardItem] = []
    used = 0
    for it in items:
        if it.q0 % unit or it.q1 % unit:
            raise ValueError(f"range [{it.q0}, {it.q1}) of sample {it.sample_id} is not aligned to {unit}")
        q = it.q0
        while q < it.q1:
            take = min(it.q1 - q, cap - used)
            current.append(ShardItem(it.pos, it.sample_id, q, q + take, it.baseline))
            q += take
            used += take
            if used == cap:
                chunks.append(tuple(current))
                current, used = [], 0
    if current:
        chunks.append(tuple(current))
    return chunks
