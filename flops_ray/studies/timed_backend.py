"""In-process training steps timed in parts: the replica's work (shards, reduction, update), the driver's, the fit's.

The parts are the per-unit costs of the step-time model (:mod:`flops_ray.studies.step_time`): a farm's
replicas do the first, its driver the second, and the allocator fit runs in a driver thread beside them.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from flops_ray.config import FarmConfig, TrainConfig
from flops_ray.data.arrays import digits
from flops_ray.messages import ShardResult, ShardTask
from flops_ray.models.factory import create_model
from flops_ray.models.losses import LossFn
from flops_ray.step.backend import Backend
from flops_ray.step.interface import Reduced
from flops_ray.studies.step_time import Costs
from flops_ray.training.trainer import Trainer, default_backend


class TimedBackend:
    """A backend timing its replicas' work apart from the driver's: their shards, and the reduction and the
    update (which a farm's replicas do); every other call goes to ``inner`` as is."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.engine_s = self.apply_s = 0.0
        self.forwards = 0

    def run(self, tasks: list[ShardTask]) -> list[ShardResult]:
        t0 = time.perf_counter()
        results = self.inner.run(tasks)
        self.engine_s += time.perf_counter() - t0
        self.forwards += sum(r.forwards for r in results)
        return results

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> Reduced:
        t0 = time.perf_counter()
        reduced = self.inner.reduce(tasks, results, sizes)
        self.apply_s += time.perf_counter() - t0
        return reduced

    def apply(self) -> tuple[float, ...]:
        t0 = time.perf_counter()
        norms = self.inner.apply()
        self.apply_s += time.perf_counter() - t0
        return norms

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@dataclass(frozen=True)
class Timed:
    """Per-step seconds of in-process steps, split into the replica's part and the driver's own, and the
    allocator fit's (in its thread, apart)."""

    step_s: float
    engine_s: float
    apply_s: float
    fit_s: float
    forwards: float
    sizes: list[int]

    @property
    def driver_s(self) -> float:
        return self.step_s - self.engine_s - self.apply_s

    def costs(self, call_s: float, task_s: float, replay_s: float) -> Costs:
        """A replica thread's and the driver's costs, with the farm's own per-call costs and the seconds per
        replayed noise number."""
        return Costs(
            query_s=self.engine_s / self.forwards,
            call_s=call_s,
            driver_s=self.driver_s,
            fit_s=self.fit_s,
            task_s=task_s,
            link_bytes_per_s=1e9,
            apply_s_per_param=self.apply_s / sum(self.sizes),
            replay_s_per_number=replay_s,
            cores=os.cpu_count() or 1,
        )


class LocalSteps(contextlib.AbstractContextManager):
    """In-process steps of the digits ViT under ``cfg`` on one thread (after one warm-up step), taken one at a
    time, so they can be interleaved with a farm's: the replica's part (shards, reduction, update) timed
    apart from the driver's own, and the allocator fit's."""

    def __init__(self, cfg: TrainConfig, seed: int):
        backends: list[TimedBackend] = []

        def factory(c: TrainConfig, model: nn.Module, loss_fn: LossFn) -> TimedBackend:
            backends.append(TimedBackend(default_backend(c.replace(farm=FarmConfig()), model, loss_fn)))
            return backends[0]

        torch.set_num_threads(1)
        self.trainer = Trainer(cfg, create_model("digits_vit", 10, 8, seed), digits("train"), backend_factory=factory)
        self.trainer.step()
        self.backend = backends[0]
        self.backend.engine_s = self.backend.apply_s = 0.0
        self.backend.forwards = 0
        self.steps, self.step_s, self.fit_s = 0, 0.0, 0.0

    def step(self) -> None:
        # The fit of the step before runs on into this one: waited for here, so a step's time is its own.
        self.fit_s += self.trainer.forward_step.fit.settle()
        self.step_s += self.trainer.step().seconds
        self.steps += 1

    def timed(self) -> Timed:
        b, n = self.backend, self.steps
        sizes = [g.size for g in self.trainer.groups]
        return Timed(self.step_s / n, b.engine_s / n, b.apply_s / n, self.fit_s / n, b.forwards / n, sizes)

    def __exit__(self, *exc) -> None:
        self.trainer.close()


def timed_steps(cfg: TrainConfig, steps: int, seed: int) -> Timed:
    """``steps`` in-process steps of the digits ViT under ``cfg`` (after one warm-up step), one thread."""
    with LocalSteps(cfg, seed) as local:
        for _ in range(steps):
            local.step()
        return local.timed()
