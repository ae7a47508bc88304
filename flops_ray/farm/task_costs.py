"""Learned task costs: seconds per forward pass of each kind of shard task, from the replicas' own timings.

A task's ``cost`` counts forward passes, but with the shared prefix a forward of a group high in the model
costs a fraction of one of a group low in it, so ordering by counted forwards can leave a round's expensive
tasks for last, where they set when it ends. The scheduler orders by estimated seconds instead. Only which
replica runs which task depends on it, never a result.

Replicas differ in speed (mixed GPUs, a loaded node), so each one's timings are divided by how much slower
it runs than the others before they teach a rate: otherwise a rate would jump with whichever replica
reported last, and so would the order.
"""

from __future__ import annotations

from collections.abc import Hashable

from flops_ray.messages import ShardTask


class TaskCosts:
    """Seconds per forward pass per ``(kind, group)``, and each replica's slowness, smoothed over the results.

    >>> from flops_ray.messages import ShardItem, TaskKind
    >>> costs = TaskCosts()
    >>> task = ShardTask(TaskKind.MAIN, 0, 1, 0, (ShardItem(0, 0, 0, 8),))
    >>> costs.estimate(task)  # nothing measured yet: its forward count
    8.0
    >>> costs.learn(task, seconds=0.4)
    >>> round(costs.estimate(task), 6)
    0.4
    """

    def __init__(self, smoothing: float = 0.5):
        self.smoothing = smoothing
        """Weight of a new measurement against what was learned before."""
        self._rate: dict[tuple[str, int | None], float] = {}
        """Seconds per forward per ``(kind, group)``, on a replica of slowness 1."""
        self._slowness: dict[Hashable, float] = {}
        """Each replica's seconds over those its task's rate predicts (the first to report sets the scale)."""

    def learn(self, task: ShardTask, seconds: float, replica: Hashable = None) -> None:
        """Take ``seconds`` (``replica``'s time running ``task``) into that replica's slowness and the rate of
        ``task``'s kind and group."""
        if task.cost <= 0 or seconds <= 0:
            return
        key, rate = (task.kind.value, task.group), seconds / task.cost
        slow = self._slowness.get(replica, 1.0)
        old = self._rate.get(key)
        if old is not None:
            slow += self.smoothing * (rate / old - slow)
            self._slowness[replica] = slow
        rate /= slow
        self._rate[key] = rate if old is None else old + self.smoothing * (rate - old)

    def estimate(self, task: ShardTask) -> float:
        """Seconds ``task`` should take on a replica of slowness 1; a kind and group not measured yet count as
        the costliest measured."""
        rate = self._rate.get((task.kind.value, task.group))
        if rate is None:
            rate = max(self._rate.values(), default=1.0)
        return task.cost * rate
