"""Learned task costs: seconds per forward pass of each kind of shard task, from the replicas' own timings.

A task's ``cost`` counts forward passes, but with the shared prefix a forward of a group high in the model
costs a fraction of one of a group low in it, so ordering by counted forwards can leave a round's expensive
tasks for last, where they set when it ends. The scheduler orders by estimated seconds instead. Only which
replica runs which task depends on it, never a result.
"""

from __future__ import annotations

from flops_ray.messages import ShardTask


class TaskCosts:
    """Seconds per forward pass per ``(kind, group)``, smoothed over the results seen.

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

    def learn(self, task: ShardTask, seconds: float) -> None:
        """Take ``seconds`` (a replica's time running ``task``) into its kind's and group's rate."""
        if task.cost <= 0 or seconds <= 0:
            return
        key, rate = (task.kind.value, task.group), seconds / task.cost
        old = self._rate.get(key)
        self._rate[key] = rate if old is None else old + self.smoothing * (rate - old)

    def estimate(self, task: ShardTask) -> float:
        """Seconds ``task`` should take; a kind and group not measured yet count as the costliest measured."""
        rate = self._rate.get((task.kind.value, task.group))
        if rate is None:
            rate = max(self._rate.values(), default=1.0)
        return task.cost * rate
