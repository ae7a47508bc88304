"""One forward-only step, independent of where queries run (DESIGN section 2).

clean pass -> pilot shards (``T_j``) -> allocation per group -> shard plan -> finalize pilots + main
shards -> reduction in canonical task order. A :class:`Backend` only executes task lists, so the
in-process backend and the Ray farm give the same result for the same seed.
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
from flops_ray.messages import CLEAN, FINALIZE, MAIN, PILOT, ShardItem, ShardResult, ShardTask
from flops_ray.seeding import STREAM_ALLOC, STREAM_ALLOC_FIT, generator
from flops_ray.shards import plan_chunks


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
    for task, res in sorted(zip(tasks, results), key=lambda tr: (tr[0].group, tr[0].kind != FINALIZE, tr[0].index)):
        if res.grad is not None:
            grads[task.group] += res.grad
    return grads


@dataclass
class StepReport:
    """What one step measured (logged per step, never needed for the maths)."""

    step: int
    clean_loss: float
    losses: np.ndarray | None = None
    """``(B,)`` per-sample clean losses."""
    counts: list[np.ndarray] = field(default_factory=list)
    """Per group ``(B,)`` query counts."""
    traces: list[np.ndarray] = field(default_factory=list)
    """Per group ``(B,)`` pilot trace estimates."""
    queries: int = 0
    """Perturbed forward passes run."""
    allocator_seconds: float = 0.0
    """Sampling allocations: on the step's critical path."""
    fit_seconds: float = 0.0
    """Fitting allocator state for the next step: overlapped with the step's queries."""
    seconds: float = 0.0
    bytes_returned: int = 0
    skipped: int = 0
    """Queries dropped for non-finite losses (``estimator.on_nonfinite = "skip"``)."""


def forward_step(
    backend: Backend,
    *,
    step: int,
    params: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    sample_ids: np.ndarray,
    groups: tuple[GroupConfig, ...],
    sizes: list[int],
    estimator: EstimatorConfig,
    allocators: list[Allocator],
    shard_cost: int,
    root_seed: int,
) -> tuple[list[np.ndarray], StepReport]:
    """Estimate the batch gradient ``g = (1/B) sum_j (1/A_j) sum_q G_jq`` of every group (paper eq. 4).

    Args:
        backend: where the queries run.
        step: the step counter (seeds the step's noise).
        params: ``(P,)`` trainable parameters.
        x: ``(B, ...)`` inputs; y: ``(B,)`` targets; sample_ids: ``(B,)`` dataset indices.
        groups, sizes: layer groups and their parameter counts ``P_g``.
        estimator: estimator settings (pair size, pilot, floor).
        allocators: one per group, stateful across steps.
        shard_cost: target forward passes per task.
        root_seed: the run's root seed.

    Returns:
        Per-group gradient estimates ``(P_g,)`` (float64) and the step's report.
    """
    t0 = time.perf_counter()
    b = len(sample_ids)
    unit, pilot = estimator.unit, estimator.pilot_queries
    backend.sync(step, params, x, y)

    clean_tasks = [
        ShardTask(
            CLEAN, step, -1, i, tuple(ShardItem(p, int(sample_ids[p]), 0, 1) for p in range(s, min(b, s + shard_cost)))
        )
        for i, s in enumerate(range(0, b, shard_cost))
    ]
    clean = backend.run(clean_tasks)
    losses = np.concatenate([r.losses for r in clean])
    emb = np.concatenate([r.embeddings for r in clean])
    report = StepReport(step, float(losses.mean()), losses)

    # A sample's trace needs all its pilot draws in one task: chunks hold whole pilots.
    pilot_chunks = plan_chunks(
        [ShardItem(p, int(sample_ids[p]), 0, pilot, float(losses[p])) for p in range(b)],
        max(pilot, shard_cost // pilot * pilot),
        unit,
    )
    pilot_tasks = [ShardTask(PILOT, step, g, i, c) for g in range(len(groups)) for i, c in enumerate(pilot_chunks)]
    pilot_results = backend.run(pilot_tasks)

    feats_losses = torch.from_numpy(losses)
    feats_emb = torch.from_numpy(emb)
    tasks: list[ShardTask] = []
    feats, minimum = [], max(estimator.floor, pilot)
    for g, cfg in enumerate(groups):
        traces = np.zeros(b)
        for task, res in zip(pilot_tasks, pilot_results):
            if task.group == g:
                traces[[it.pos for it in task.items]] = res.traces
        feats.append(AllocationFeatures(torch.from_numpy(traces), feats_losses, feats_emb))
        ta = time.perf_counter()
        counts = (
            allocators[g]
            .allocate(
                feats[g],
                total=cfg.queries_per_sample * b,
                minimum=minimum,
                unit=unit,
                gen=generator(root_seed, STREAM_ALLOC, step, g),
            )
            .numpy()
        )
        report.allocator_seconds += time.perf_counter() - ta
        report.counts.append(counts)
        report.traces.append(traces)
        weights = 1.0 / (b * counts)
        tasks += [
            ShardTask(FINALIZE, step, g, i, c, tuple(float(weights[it.pos]) for it in c))
            for i, c in enumerate(pilot_chunks)
        ]
        rest = [
            ShardItem(p, int(sample_ids[p]), pilot, int(counts[p]), float(losses[p]))
            for p in range(b)
            if counts[p] > pilot
        ]
        tasks += [
            ShardTask(MAIN, step, g, i, c, tuple(float(weights[it.pos]) for it in c))
            for i, c in enumerate(plan_chunks(rest, shard_cost, unit))
        ]

    def fit_allocators() -> None:
        tf = time.perf_counter()
        for g, cfg in enumerate(groups):
            allocators[g].update(
                feats[g], cfg.queries_per_sample * b, minimum, generator(root_seed, STREAM_ALLOC_FIT, step, g)
            )
        report.fit_seconds = time.perf_counter() - tf

    # The fit advances allocator state before the queries finish; a failed step must not keep it.
    saved = [{k: v.clone() for k, v in a.state_dict().items()} for a in allocators]
    try:
        results = backend.run(tasks, meanwhile=fit_allocators)
        grads = backend.reduce(tasks, results, sizes)
    except BaseException:
        for allocator, state in zip(allocators, saved):
            allocator.load_state_dict(state)
        raise
    everything = clean + pilot_results + results
    report.queries = sum(r.forwards for r in pilot_results + results)
    report.bytes_returned = sum(r.nbytes for r in everything)
    # A finalize re-reads its pilot's queries, whose skips the pilot result already counted.
    report.skipped = sum(r.skipped for r in clean + pilot_results) + sum(
        r.skipped for t, r in zip(tasks, results) if t.kind != FINALIZE
    )
    report.seconds = time.perf_counter() - t0
    return grads, report
