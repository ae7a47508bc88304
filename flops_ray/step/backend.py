"""Where a forward step's queries run: the backend interface, and the reduction every backend shares.

A :class:`Backend` executes task lists on replicas that own the parameters and reduces the results where they
are; :func:`reduce_in_order` is the one order of float64 sums (by task order, whatever order the tasks finished
in) that makes the in-process backend and the Ray farm give the same result for the same seed.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from flops_ray.messages import ReplicaState, ShardResult, ShardTask
from flops_ray.step.interface import Reduced


class Backend(Protocol):
    """Executes shard tasks on replicas that own the parameters and hold the step's batch."""

    def sync(self, step: int, x: np.ndarray, y: np.ndarray) -> None:
        """Give every replica the step's batch (one broadcast)."""

    def run(self, tasks: list[ShardTask]) -> list[ShardResult]:
        """Evaluate ``tasks``; results come back in task order whatever order they finished in."""

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> Reduced:
        """Sum the weighted tasks' gradients per group ``(P_g,)`` where the update will be applied."""

    def apply(self) -> tuple[float, ...]:
        """Apply the last reduced gradient on every replica (clip, optimizer step): the step is done. Returns
        each group's gradient norm before clipping."""

    def state(self) -> ReplicaState:
        """The replicas' parameters and optimizer state (a checkpoint, an evaluation); checks they agree."""

    def load_state(self, state: ReplicaState) -> None:
        """Make ``state`` every replica's (a resumed run)."""

    def where(self) -> str:
        """One line for a run's start-up: how many replicas are up, on which devices."""

    def close(self) -> None:
        """Release replicas."""


def reduce_in_order(tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> list[np.ndarray]:
    """Sum the gradient partials of each group in float64, in task index order (deterministic)."""
    grads = [np.zeros(n, dtype=np.float64) for n in sizes]
    for task, res in sorted(zip(tasks, results), key=lambda tr: tr[0].order):
        if res.grad is not None:
            grads[task.group] += res.grad
    return grads
