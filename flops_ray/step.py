"""One forward-only step, independent of where queries run (docs/DESIGN.md section 2).

clean pass -> pilot shards (``T_j``) -> allocation per group -> shard plan -> finalize pilots + main
shards -> reduction in canonical task order. A :class:`Backend` only executes task lists, so the
in-process backend and the Ray farm give the same result for the same seed; the task lists come
from the pure planners in :mod:`flops_ray.plan`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from flops_ray.allocators import AllocationFeatures, Allocator
from flops_ray.config import EstimatorConfig, GroupConfig
from flops_ray.messages import ShardResult, ShardTask, TaskKind
from flops_ray.plan import plan_clean, plan_main, plan_pilot, plan_pilot_chunks
from flops_ray.seeding import STREAM_ALLOC, STREAM_ALLOC_FIT, generator


class Backend(Protocol):
    """Executes shard tasks on replicas holding the current parameters and batch."""

    def sync(self, step: int, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Give every replica the step's parameters ``(P,)`` and batch (one broadcast)."""

    def run(self, tasks: list[ShardTask], meanwhile: Callable[[], None] | None = None) -> list[ShardResult]:
        """Evaluate ``tasks``; results come back in task order whatever order they finished in.

        ``meanwhile`` is called once, after the tasks are handed out, for driver work that overlaps them.
        """

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> list[np.ndarray]:
        """Per-group gradient sums ``(P_g,)`` of the weighted tasks, in canonical task order."""

    def close(self) -> None:
        """Release replicas."""


def reduce_in_order(tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> list[np.ndarray]:
    """Sum the gradient partials of each group in float64, in task index order (deterministic)."""
    grads = [np.zeros(n, dtype=np.float64) for n in sizes]
    for task, res in sorted(
        zip(tasks, results), key=lambda tr: (tr[0].group, tr[0].kind != TaskKind.FINALIZE, tr[0].index)
    ):
        if res.grad is not None:
            grads[task.group] += res.grad
    return grads


@dataclass
class StepReport:
    """What one step measured: the trainer returns it, the metrics log writes it, never needed for the maths."""

    step: int
    loss: float
    """Mean clean loss of the step's batch."""
    losses: np.ndarray | None = None
    """``(B,)`` per-sample clean losses."""
    counts: list[np.ndarray] = field(default_factory=list)
    """Per group ``(B,)`` query counts."""
    traces: list[np.ndarray] = field(default_factory=list)
    """Per group ``(B,)`` pilot trace estimates."""
    queries: int = 0
    """Perturbed forward passes run."""
    seconds: float = 0.0
    """Wall time of the whole step (the optimizer update included, once the trainer has applied it)."""
    allocator_seconds: float = 0.0
    """Sampling allocations: on the step's critical path."""
    fit_seconds: float = 0.0
    """Fitting allocator state for the next step: overlapped with the step's queries."""
    bytes_returned: int = 0
    skipped: int = 0
    """Queries dropped for non-finite losses (``estimator.on_nonfinite = "skip"``)."""
    accuracy: float | None = None
    """Test accuracy after the step, when the step was an evaluation point."""


class ForwardStep:
    """Estimates the batch gradient ``g = (1/B) sum_j (1/A_j) sum_q G_jq`` of every group (paper eq. 4).

    Holds what stays fixed across steps; each call runs one step on ``backend``.

    Args:
        backend: where the queries run.
        groups: layer groups; sizes: their parameter counts ``P_g``.
        estimator: estimator settings (pair size, pilot, floor).
        allocators: one per group, stateful across steps.
        shard_cost: target forward passes per task.
        root_seed: the run's root seed.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        groups: tuple[GroupConfig, ...],
        sizes: list[int],
        estimator: EstimatorConfig,
        allocators: list[Allocator],
        shard_cost: int,
        root_seed: int,
    ):
        self.backend = backend
        self.groups = groups
        self.sizes = sizes
        self.estimator = estimator
        self.allocators = allocators
        self.shard_cost = shard_cost
        self.root_seed = root_seed

    def __call__(
        self, step: int, params: np.ndarray, x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray
    ) -> tuple[list[np.ndarray], StepReport]:
        """Run step ``step`` on parameters ``(P,)`` and the batch ``x (B, ...)``, ``y (B,)``, ``sample_ids (B,)``.

        Returns:
            Per-group gradient estimates ``(P_g,)`` (float64) and the step's report.
        """
        t0 = time.perf_counter()
        b = len(sample_ids)
        unit, pilot = self.estimator.unit, self.estimator.pilot_queries
        self.backend.sync(step, params, x, y)
        clean = self.backend.run(plan_clean(step, sample_ids, self.shard_cost))
        losses = np.concatenate([r.losses for r in clean])
        emb = torch.from_numpy(np.concatenate([r.embeddings for r in clean]))
        report = StepReport(step, float(losses.mean()), losses)

        pilot_chunks = plan_pilot_chunks(sample_ids, losses, pilot, self.shard_cost, unit)
        pilot_tasks = plan_pilot(step, len(self.groups), pilot_chunks)
        pilot_results = self.backend.run(pilot_tasks)

        tasks: list[ShardTask] = []
        feats, minimum = [], max(self.estimator.floor, pilot)
        for g, cfg in enumerate(self.groups):
            traces = np.zeros(b)
            for task, res in zip(pilot_tasks, pilot_results):
                if task.group == g:
                    traces[[it.pos for it in task.items]] = res.traces
            feats.append(AllocationFeatures(torch.from_numpy(traces), torch.from_numpy(losses), emb))
            ta = time.perf_counter()
            gen = generator(self.root_seed, STREAM_ALLOC, step, g)
            counts = self.allocators[g].allocate(feats[g], cfg.queries_per_sample * b, minimum, unit, gen).numpy()
            report.allocator_seconds += time.perf_counter() - ta
            report.counts.append(counts)
            report.traces.append(traces)
            tasks += plan_main(step, g, counts, sample_ids, losses, pilot_chunks, pilot, self.shard_cost, unit)

        def fit_allocators() -> None:
            tf = time.perf_counter()
            for g, cfg in enumerate(self.groups):
                gen = generator(self.root_seed, STREAM_ALLOC_FIT, step, g)
                self.allocators[g].update(feats[g], cfg.queries_per_sample * b, minimum, gen)
            report.fit_seconds = time.perf_counter() - tf

        # The fit advances allocator state before the queries finish; a failed step must not keep it.
        saved = [{k: v.clone() for k, v in a.state_dict().items()} for a in self.allocators]
        try:
            results = self.backend.run(tasks, meanwhile=fit_allocators)
            grads = self.backend.reduce(tasks, results, self.sizes)
        except BaseException:
            for allocator, state in zip(self.allocators, saved):
                allocator.load_state_dict(state)
            raise
        report.queries = sum(r.forwards for r in pilot_results + results)
        report.bytes_returned = sum(r.nbytes for r in clean + pilot_results + results)
        # A finalize re-reads its pilot's queries, whose skips the pilot result already counted.
        report.skipped = sum(r.skipped for r in clean + pilot_results) + sum(
            r.skipped for t, r in zip(tasks, results) if t.kind != TaskKind.FINALIZE
        )
        report.seconds = time.perf_counter() - t0
        return grads, report
