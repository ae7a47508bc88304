"""The in-process backend: one replica, tasks run one after another in this process."""

from __future__ import annotations

import copy

import numpy as np
import torch

from flops_ray.config import UpdateRule
from flops_ray.messages import ReplicaState, ShardResult, ShardTask
from flops_ray.models.groups import to_numpy
from flops_ray.replica.engine import QueryEngine
from flops_ray.replica.update import ParamUpdate
from flops_ray.step.forward import Reduced, reduce_in_order


class LocalBackend:
    """Runs every shard on one :class:`~flops_ray.replica.engine.QueryEngine` (the embedded, no-Ray path), which owns
    the parameters and applies each step's update with its own optimizer.

    Args:
        engine: the replica.
        rule: the optimizer and clipping of :meth:`apply` (studies that never apply can leave the default).
    """

    def __init__(self, engine: QueryEngine, rule: UpdateRule | None = None):
        self.engine = engine
        self.update = ParamUpdate([[p for _, p in g.params] for g in engine.groups], rule or UpdateRule())
        self.version = 0
        self._grads: tuple[np.ndarray, ...] | None = None

    def sync(self, step: int, x: np.ndarray, y: np.ndarray) -> None:
        self.engine.set_batch(step, x, y)

    def run(self, tasks: list[ShardTask]) -> list[ShardResult]:
        return [self.engine.run(t) for t in tasks]

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> Reduced:
        self._grads = tuple(reduce_in_order(tasks, results, sizes))
        return Reduced(tuple(bool(np.isfinite(g).all()) for g in self._grads), self._grads)

    def apply(self) -> None:
        if self._grads is None:
            raise RuntimeError("no reduced gradient to apply: call reduce first")
        device = self.engine.device
        self.update.apply([torch.from_numpy(g).to(device) for g in self._grads])
        self._grads = None
        self.version += 1

    def state(self) -> ReplicaState:
        # A copy: the optimizer keeps updating its own tensors in place.
        return ReplicaState(self.version, to_numpy(self.engine.get_params()), copy.deepcopy(self.update.state_dict()))

    def load_state(self, state: ReplicaState) -> None:
        self.engine.set_params(state.params)
        self.update.load_state_dict(state.optimizer)
        self.version = state.version

    def where(self) -> str:
        return f"1 in-process replica on {self.engine.device}"

    def close(self) -> None:
        pass
