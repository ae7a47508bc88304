"""One forward-only step, independent of where queries run (docs/DESIGN.md section 2).

clean pass -> pilot shards (only where the step reads their ``T_j``) -> allocation per group -> shard
plan -> main shards -> reduction. A :class:`Backend` executes task lists and reduces them where its replicas are, so
the in-process backend and the Ray farm give the same result for the same seed; the task lists come
from the pure planners in :mod:`flops_ray.step.plan`. The replicas own the parameters: the step never sees
them, and the trainer asks the backend to apply the reduced gradient on every replica.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from flops_ray.allocation.allocators import AllocationFeatures, Allocator
from flops_ray.allocation.fit import AllocatorFit
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import AllocatorConfig, EstimatorConfig, GroupConfig
from flops_ray.estimators import queries_per_draw
from flops_ray.messages import ReplicaState, ShardResult, ShardTask
from flops_ray.seeding import STREAM_ALLOC, STREAM_ALLOC_FIT, generator
from flops_ray.step.checks import least_queries, reads_pilot, reuses_pilot
from flops_ray.step.plan import plan_clean, plan_main, plan_pilot, plan_pilot_chunks


@dataclass(frozen=True)
class Reduced:
    """A step's reduced gradient, as far as the driver sees it."""

    finite: tuple[bool, ...]
    """Per group: whether the gradient estimate is finite (an update with a non-finite one is not applied)."""
    grads: tuple[np.ndarray, ...] | None = None
    """Per group ``(P_g,)`` float64 sums, where the reduction ran in this process (the in-process backend);
    None where they stay on the replicas."""


class Backend(Protocol):
    """Executes shard tasks on replicas that own the parameters and hold the step's batch."""

    def sync(self, step: int, x: np.ndarray, y: np.ndarray) -> None:
        """Give every replica the step's batch (one broadcast)."""

    def run(self, tasks: list[ShardTask]) -> list[ShardResult]:
        """Evaluate ``tasks``; results come back in task order whatever order they finished in."""

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> Reduced:
        """Sum the weighted tasks' gradients per group ``(P_g,)`` where the update will be applied."""

    def apply(self) -> None:
        """Apply the last reduced gradient on every replica (clip, optimizer step): the step is done."""

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
    """Per group ``(B,)`` trace estimates the allocator read (from ``allocator.signal``)."""
    variance_ratio: list[float] = field(default_factory=list)
    """Per group ``J(A) / J(equal)`` on those traces: below 1 when the allocation is predicted to pay."""
    queries: int = 0
    """Perturbed forward passes run."""
    seconds: float = 0.0
    """Wall time of the whole step (the optimizer update included, once the trainer has applied it)."""
    allocator_seconds: float = 0.0
    """Sampling allocations: on the step's critical path."""
    fit_seconds: float = 0.0
    """The allocator fit this step adopted before its allocation: the previous step's, which ran in a thread
    from that step's main round on (it costs step time only where it outlasts that)."""
    bytes_returned: int = 0
    skipped: int = 0
    """Queries dropped for non-finite losses (``estimator.on_nonfinite = "skip"``)."""
    accuracy: float | None = None
    """Test accuracy after the step, when the step was an evaluation point."""


class ForwardStep:
    """Estimates the batch gradient ``g = (1/B) sum_j (1/A_j) sum_q G_jq`` of every group (paper eq. 4).

    Holds what stays fixed across steps; each call runs one step on ``backend``. A step's allocator fit
    (``Allocator.update``, for the next step) runs on copies of the allocators in a thread, from the step's
    main round until the next step's allocation adopts it (:mod:`flops_ray.allocation.fit`), so it overlaps
    the queries, the update and the next clean pass; a failed step drops its fit.

    Args:
        backend: where the queries run.
        groups: layer groups; sizes: their parameter counts ``P_g``.
        estimator: estimator settings (pair size, pilot, floor).
        allocator: allocator settings (the trace signal; the kind is in ``allocators``).
        allocators: one per group, stateful across steps.
        memory: the per-sample trace memory, fed by the queries of the steps that allocate from it.
        shard_cost: target forward passes per task.
        root_seed: the run's root seed.
        clean_shard: samples per clean-pass task (None: ``shard_cost``).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        groups: tuple[GroupConfig, ...],
        sizes: list[int],
        estimator: EstimatorConfig,
        allocator: AllocatorConfig,
        allocators: list[Allocator],
        memory: TraceMemory,
        shard_cost: int,
        root_seed: int,
        clean_shard: int | None = None,
    ):
        self.backend = backend
        self.groups = groups
        self.sizes = sizes
        self.estimator = estimator
        self.allocator = allocator
        self.allocators = allocators
        self.memory = memory
        self.shard_cost = shard_cost
        self.clean_shard = clean_shard or shard_cost
        self.root_seed = root_seed
        self.reuse_pilot = reuses_pilot(estimator, allocator)
        self.pilot_round = reads_pilot(estimator, allocator)
        self.committing = False
        """True from the moment a step's results start changing state until the trainer has applied it."""
        self.minimum = least_queries(estimator, allocator)
        self.fit = AllocatorFit(allocators)
        """The last step's allocator fit: ``fit.settle()`` before reading allocator state."""

    def _uses_memory(self, g: int, proxies: np.ndarray) -> bool:
        """Whether group ``g`` allocates from the trace memory: asked for, or the clean pass has no proxy."""
        signal = self.allocator.signal
        return signal == "memory" or (signal == "clean" and not np.isfinite(proxies[:, g]).all())

    def _signal(self, g: int, ids: torch.Tensor, proxies: np.ndarray, pilot: np.ndarray) -> np.ndarray:
        """``(B,)`` the trace estimates group ``g``'s allocator reads, from the configured signal."""
        if self.allocator.signal == "pilot":
            return pilot
        if self._uses_memory(g, proxies):
            return self.memory.estimate(g, ids).numpy()
        return proxies[:, g]

    def __call__(self, step: int, x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray) -> tuple[Reduced, StepReport]:
        """Run step ``step`` on the batch ``x (B, ...)``, ``y (B,)``, ``sample_ids (B,)`` and reduce its gradient
        estimates where the backend's replicas are (the backend's :meth:`~Backend.apply` then applies them).

        Returns:
            The reduced gradient and the step's report.

        Raises:
            FloatingPointError: a group's gradient estimate is not finite (nothing changed: the step's
                allocator fit is dropped).
        """
        t0 = time.perf_counter()
        b = len(sample_ids)
        unit, pilot = queries_per_draw(self.estimator), self.estimator.pilot_queries
        ids = torch.as_tensor(sample_ids, dtype=torch.long)
        self.backend.sync(step, x, y)
        clean = self.backend.run(plan_clean(step, sample_ids, self.clean_shard))
        losses = np.concatenate([r.losses for r in clean])
        emb = torch.from_numpy(np.concatenate([r.embeddings for r in clean]))
        proxies = np.concatenate([r.proxies for r in clean])
        report = StepReport(step, float(losses.mean()), losses)

        # A pilot round (a barrier) only where the step reads its traces; otherwise it runs with the main queries.
        pilot_tasks = []
        if self.pilot_round:
            chunks = plan_pilot_chunks(sample_ids, losses, pilot, self.shard_cost, unit)
            pilot_tasks = plan_pilot(step, len(self.groups), chunks)
        pilot_results = self.backend.run(pilot_tasks) if pilot_tasks else []

        tasks: list[ShardTask] = []
        feats = []
        self.fit.settle()
        report.fit_seconds = self.fit.take_seconds()
        for g, cfg in enumerate(self.groups):
            pilot_traces = _per_sample(pilot_tasks, pilot_results, g, b)[0]
            traces = self._signal(g, ids, proxies, pilot_traces)
            feats.append(AllocationFeatures(torch.from_numpy(traces), torch.from_numpy(losses), emb))
            ta = time.perf_counter()
            gen = generator(self.root_seed, STREAM_ALLOC, step, g)
            total = cfg.queries_per_sample * b
            counts = self.allocators[g].allocate(feats[g], total, self.minimum, unit, gen).numpy()
            report.allocator_seconds += time.perf_counter() - ta
            report.counts.append(counts)
            report.traces.append(traces)
            used = counts if self.reuse_pilot else counts - pilot
            report.variance_ratio.append(variance_ratio(traces, used, total / b))
            # Per-sample traces of the main queries cost up to a fifth of an LR shard: only a memory read needs them.
            feed = self._uses_memory(g, proxies)
            tasks += plan_main(
                step, g, counts, sample_ids, losses, pilot, self.shard_cost, unit, self.reuse_pilot, feed
            )

        self.fit.start(
            step,
            [
                (
                    feats[g],
                    cfg.queries_per_sample * b,
                    self.minimum,
                    generator(self.root_seed, STREAM_ALLOC_FIT, step, g),
                )
                for g, cfg in enumerate(self.groups)
            ],
        )
        try:
            results = self.backend.run(tasks)
            reduced = self.backend.reduce(tasks, results, self.sizes)
            bad = [cfg.name for cfg, ok in zip(self.groups, reduced.finite) if not ok]
            if bad:
                raise FloatingPointError(f"step {step}: the gradient estimate of groups {bad} is not finite")
        except BaseException:
            self.fit.discard()
            raise
        # From here the step changes state for good: the trainer clears this once the step is applied.
        self.committing = True
        # Every query of the visit informs the memory, for later steps only.
        for g in range(len(self.groups)):
            visit, dof = _per_sample(pilot_tasks + tasks, pilot_results + results, g, b)
            self.memory.observe(g, ids, torch.from_numpy(visit), torch.from_numpy(dof))
        report.queries = sum(r.forwards for r in pilot_results + results)
        report.bytes_returned = sum(r.nbytes for r in clean + pilot_results + results)
        report.skipped = sum(r.skipped for r in clean + pilot_results + results)
        report.seconds = time.perf_counter() - t0
        return reduced, report


def _per_sample(
    tasks: list[ShardTask], results: list[ShardResult], group: int, b: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(B,)`` trace estimates of ``group`` pooled over tasks (weighted by degrees of freedom) and their dof.

    NaN where no task measured a sample's trace.
    """
    total, dof = np.zeros(b), np.zeros(b)
    for task, res in zip(tasks, results):
        if task.group == group and res.traces is not None:
            pos = np.array([it.pos for it in task.items])
            ok = res.trace_dof > 0
            np.add.at(total, pos[ok], res.trace_dof[ok] * res.traces[ok])
            np.add.at(dof, pos[ok], res.trace_dof[ok])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(dof > 0, total / dof, np.nan), dof


def variance_ratio(traces: np.ndarray, used: np.ndarray, equal: float) -> float:
    """``J(A) / J(equal)``: the estimate's predicted variance against equal allocation of the same budget
    (Theorem 1: ``J(A) = sum_j T_j / A_j``), on the traces the allocator read; NaN without traces."""
    if not np.isfinite(traces).all() or traces.sum() <= 0:
        return float("nan")
    return float((traces / used).sum() / (traces.sum() / equal))
