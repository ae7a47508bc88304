"""Learned task costs: seconds per forward pass of each kind of shard task, from the replicas' own timings.

A task's ``cost`` counts forward passes, but with the shared prefix a forward of a group high in the model
costs a fraction of one of a group low in it, so ordering by counted forwards can leave a round's expensive
tasks for last, where they set when it ends. The scheduler orders by estimated seconds instead. Only which
replica runs which task depends on it, never a result.

Replicas differ in speed (mixed GPUs, a loaded node): a timing is modelled as ``rate[kind, group] x
slowness[replica]``, both learned, so a rate does not jump with whichever replica reported last. Both are
smoothed in logs and the replicas' mean log slowness is held at 0: only their product is seen, and
smoothing the factors as they came let their scales drift apart without bound.
"""

from __future__ import annotations

import math
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
        """Weight of a new measurement against what was learned before (1.0: a kind's rate is its first
        timing and later ones teach only the replicas' slowness)."""
        self._log_rate: dict[tuple[str, int | None], float] = {}
        """Log seconds per forward per ``(kind, group)``, less the mean of ``_log_slow``."""
        self._log_slow: dict[Hashable, float] = {}
        """Each replica's log slowness (its timings over what its tasks' rates predict), plus their mean: holding
        the offset in the mean keeps an update O(1) however many replicas and kinds there are. A replacement is
        a new key, starting from the average of the live ones (a dead replica is forgotten)."""
        self._log_slow_sum = 0.0

    def _mean(self) -> float:
        return self._log_slow_sum / len(self._log_slow) if self._log_slow else 0.0

    def learn(self, task: ShardTask, seconds: float, replica: Hashable = None) -> None:
        """Take ``seconds`` (``replica``'s time running ``task``) into that replica's slowness and the rate of
        ``task``'s kind and group."""
        if task.cost <= 0 or seconds <= 0:
            return
        key, seen, mean = (task.kind.value, task.group), math.log(seconds / task.cost), self._mean()
        slow = self._log_slow[replica] - mean if replica in self._log_slow else 0.0  # a new one: average
        old = self._log_rate.get(key)
        if old is not None:
            old += mean
            slow += self.smoothing * (seen - old - slow)
            self._log_slow_sum += slow + mean - self._log_slow.get(replica, 0.0)
            self._log_slow[replica] = slow + mean
        seen -= slow
        self._log_rate[key] = (seen if old is None else old + self.smoothing * (seen - old)) - mean

    @property
    def replicas(self) -> int:
        """Replicas whose slowness is known."""
        return len(self._log_slow)

    def forget(self, replica: Hashable) -> None:
        """Drop ``replica`` (it died): the others' predicted timings stay as they were, and :meth:`estimate`
        becomes the average over the replicas left."""
        if replica not in self._log_slow:
            return
        mean = self._mean()
        self._log_slow_sum -= self._log_slow.pop(replica)
        if not self._log_slow:  # the mean falls back to 0: carry the last one into the rates
            self._log_rate = {key: rate + mean for key, rate in self._log_rate.items()}
            self._log_slow_sum = 0.0

    def estimate(self, task: ShardTask) -> float:
        """Seconds ``task`` should take on a replica of average speed; a kind and group not measured yet count
        as the costliest measured."""
        mean = self._mean()
        log_rate = self._log_rate.get((task.kind.value, task.group))
        if log_rate is None:
            log_rate = max(self._log_rate.values(), default=-mean)
        return task.cost * math.exp(log_rate + mean)
