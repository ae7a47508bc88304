"""Learned task costs: the order of a round's tasks follows their cost, not which replica ran them last."""

from __future__ import annotations

import itertools

import pytest

from flops_ray.farm.task_costs import TaskCosts
from flops_ray.messages import ShardItem, ShardTask, TaskKind

SECONDS_PER_FORWARD = {0: 1.0, 1: 0.5}
"""Group 0's forwards cost twice group 1's (a group low in the model against one high in it)."""
SLOWNESS = {"fast": 1.0, "slow": 3.0}


def _task(group: int, forwards: int = 8) -> ShardTask:
    return ShardTask(TaskKind.MAIN, 0, group, 0, (ShardItem(0, 0, 0, forwards),))


@pytest.mark.parametrize("last", [("fast", "slow"), ("slow", "fast")])
def test_each_replicas_slowness_is_divided_out_of_the_rates(last):
    """Both replicas run both groups, in turn; the group's last result comes from the replicas in ``last``.
    Pooled over replicas (the old rule), group 1 looked 1.5x group 0 when the slow replica reported it last:
    the order flipped. With slowness divided out, group 0 stays about twice group 1 either way."""
    costs = TaskCosts()
    turns = list(itertools.product(SLOWNESS, SECONDS_PER_FORWARD)) * 5
    turns += [(last[0], 0), (last[1], 1)]
    for replica, group in turns:
        costs.learn(_task(group), 8 * SECONDS_PER_FORWARD[group] * SLOWNESS[replica], replica)
    ratio = costs.estimate(_task(0)) / costs.estimate(_task(1))
    assert ratio == pytest.approx(2.0, rel=0.02)


def test_a_group_first_measured_on_a_slow_replica_is_scaled_by_its_slowness():
    """The slow replica's slowness is known from group 0; its first result of group 1 counts at that speed."""
    costs = TaskCosts()
    for _ in range(6):
        costs.learn(_task(0), 8.0, "fast")
        costs.learn(_task(0), 24.0, "slow")
    costs.learn(_task(1), 12.0, "slow")
    assert costs.estimate(_task(1)) / costs.estimate(_task(0)) == pytest.approx(0.5, rel=0.02)
