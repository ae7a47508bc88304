"""The in-process backend: one replica, tasks run one after another in this process."""

from __future__ import annotations

import contextlib

import numpy as np

from flops_ray.messages import ReplicaState, ShardResult, ShardTask, StepUpdate, UpdateSource
from flops_ray.replica.replica import Replica
from flops_ray.replica.threads import intra_op_threads
from flops_ray.step.backend import reduce_in_order
from flops_ray.step.interface import Reduced


class LocalBackend:
    """Runs every shard on one :class:`~flops_ray.replica.replica.Replica` (the embedded, no-Ray path), which owns
    the parameters and applies each step's update with its own optimizer.

    Args:
        replica: the replica.
        threads: torch intra-op threads its work runs on (:mod:`flops_ray.replica.threads`: a farm replica's
            count gives the farm's parameters bit for bit); 0 leaves this process's count.
    """

    def __init__(self, replica: Replica, threads: int = 0):
        self.replica = replica
        self.threads = threads
        self._grads: tuple[np.ndarray, ...] | None = None

    def _threads(self) -> contextlib.AbstractContextManager:
        return intra_op_threads(self.threads) if self.threads else contextlib.nullcontext()

    def sync(self, step: int, x: np.ndarray, y: np.ndarray) -> None:
        with self._threads():
            self.replica.sync(step, x, y)

    def run(self, tasks: list[ShardTask]) -> list[ShardResult]:
        with self._threads():
            return [self.replica.run(t) for t in tasks]

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> Reduced:
        self._grads = tuple(reduce_in_order(tasks, results, sizes))
        return Reduced(tuple(bool(np.isfinite(g).all()) for g in self._grads), self._grads)

    def apply(self) -> tuple[float, ...]:
        if self._grads is None:
            raise RuntimeError("no reduced gradient to apply: call reduce first")
        with self._threads():
            norms = self.replica.apply(StepUpdate(self.replica.version, UpdateSource.GRADS, grads=self._grads))
        self._grads = None
        return norms

    def state(self) -> ReplicaState:
        return self.replica.export_state()

    def load_state(self, state: ReplicaState) -> None:
        self.replica.adopt(state)

    def where(self) -> str:
        return f"1 in-process replica on {self.replica.device}"

    def close(self) -> None:
        pass
