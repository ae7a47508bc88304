"""The in-process backend: one replica, tasks run one after another in this process."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flops_ray.engine import QueryEngine
from flops_ray.messages import ShardResult, ShardTask
from flops_ray.step import reduce_in_order


class LocalBackend:
    """Runs every shard on one :class:`~flops_ray.engine.QueryEngine` (the embedded, no-Ray path)."""

    def __init__(self, engine: QueryEngine):
        self.engine = engine

    def sync(self, step: int, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        self.engine.set_params(params)
        self.engine.set_batch(step, x, y)

    def run(self, tasks: list[ShardTask], meanwhile: Callable[[], None] | None = None) -> list[ShardResult]:
        # One process: nothing to overlap with, so the driver's work simply goes first.
        if meanwhile is not None:
            meanwhile()
        return [self.engine.run(t) for t in tasks]

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> list[np.ndarray]:
        return reduce_in_order(tasks, results, sizes)

    def where(self) -> str:
        return f"1 in-process replica on {self.engine.device}"

    def close(self) -> None:
        pass
