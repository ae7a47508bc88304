"""One forward-only step, independent of where queries run (docs/DESIGN.md section 2).

clean pass -> pilot shards (only where the step reads their ``T_j``) -> allocation per group -> shard
plan -> main shards -> reduction. A :class:`Backend` executes task lists and reduces them where its replicas are, so
the in-process backend and the Ray farm give the same result for the same seed; the task lists come
from the pure planners in :mod:`flops_ray.step.plan`. The replicas own the parameters: the step's estimate never
reads them, :meth:`ForwardStep.apply` has the backend apply the reduced gradient on every replica, and
:meth:`ForwardStep.copy_to` copies them out for an evaluation or a checkpoint.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from flops_ray.allocation.allocators import AllocationFeatures, Allocator
from flops_ray.allocation.fit import AllocatorFit, FitWork
from flops_ray.allocation.joint import scaled_joint_counts
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import AllocatorConfig, EstimatorConfig, GroupConfig
from flops_ray.estimators import queries_per_draw
from flops_ray.messages import ReplicaState, ShardTask
from flops_ray.models.groups import unflatten_into
from flops_ray.seeding import STREAM_ALLOC, STREAM_ALLOC_FIT, generator
from flops_ray.step.backend import Backend
from flops_ray.step.checks import least_queries, reads_pilot, reuses_pilot
from flops_ray.step.interface import PoisonSampleError, Reduced, StepReport
from flops_ray.step.plan import plan_clean, plan_main, plan_pilot, plan_pilot_chunks
from flops_ray.step.rounds import CleanPass, Round
from flops_ray.step.telemetry import cosine, filled, signal_to_noise


class ForwardStep:
    """Estimates the batch gradient ``g = (1/B) sum_j (1/A_j) sum_q G_jq`` of every group (paper eq. 4).

    Holds what stays fixed across steps; each call runs one step on ``backend``. A step's allocator fit
    (``Allocator.update``, for the next step) runs on copies of the allocators in a thread, from the step's
    main round until the next step's allocation adopts it (:mod:`flops_ray.allocation.fit`), so it overlaps
    the queries, the update and the next clean pass; a failed step drops its fit.

    Args:
        backend: where the queries run.
        groups: layer groups; sizes: their parameter counts ``P_g``; widths: their noise widths
            (:attr:`~flops_ray.models.groups.ResolvedGroup.noise_width`: the joint allocation reads clean-pass
            proxies times widths where every group has one, else the trace memory's levels).
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
        widths: list[float | None],
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
        self.widths = widths
        self.estimator = estimator
        self.allocator = allocator
        self.allocators = allocators
        self.memory = memory
        self.shard_cost = shard_cost
        self.clean_shard = clean_shard or shard_cost
        self.root_seed = root_seed
        self.unit = queries_per_draw(estimator)
        self.reuse_pilot = reuses_pilot(estimator, allocator)
        self.pilot_round = reads_pilot(estimator, allocator)
        self.committing = False
        """True from the moment a step's results start changing state until :meth:`apply` has applied it."""
        self.minimum = least_queries(estimator, allocator)
        self.fit = AllocatorFit(allocators)
        """The last step's allocator fit: ``fit.settle()`` before reading allocator state."""
        self.poisoned: set[int] = set()
        """Dataset indices of samples that kill the replicas running them, left out of every batch
        (``farm.skip_poison``; found again after a resume, with the same result)."""
        self._previous: dict[int, np.ndarray | None] = {}
        """Per group, the last step's estimate where the driver saw it (for the telemetry's cosine)."""

    def __call__(self, step: int, x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray) -> tuple[Reduced, StepReport]:
        """:meth:`_step`, leaving out the samples that kill the replicas running them: one the backend finds
        (:class:`PoisonSampleError`, with ``farm.skip_poison``) is added to :attr:`poisoned` and the step runs
        again on the rest of the batch, a function of the batch and the poison."""
        while True:
            keep = ~np.isin(sample_ids, sorted(self.poisoned))
            if not keep.any():
                raise RuntimeError(f"step {step}: every sample of the batch kills the replicas that run it")
            # Fancy indexing copies the batch: only when a sample is left out.
            rows = slice(None) if keep.all() else keep
            try:
                reduced, report = self._step(step, x[rows], y[rows], sample_ids[rows])
            except PoisonSampleError as exc:
                if exc.sample_id in self.poisoned or exc.sample_id not in sample_ids:
                    raise
                self.poisoned.add(exc.sample_id)
                continue
            report.skipped_samples = tuple(int(i) for i in sample_ids[~keep])
            return reduced, report

    def _step(self, step: int, x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray) -> tuple[Reduced, StepReport]:
        """Run step ``step`` on the batch ``x (B, ...)``, ``y (B,)``, ``sample_ids (B,)`` and reduce its gradient
        estimates where the backend's replicas are (:meth:`apply` then applies them).

        Returns:
            The reduced gradient and the step's report.

        Raises:
            FloatingPointError: a group's gradient estimate is not finite (nothing changed: the step's
                allocator fit is dropped).
        """
        t0 = time.perf_counter()
        ids = torch.as_tensor(sample_ids, dtype=torch.long)
        self.backend.sync(step, x, y)
        clean = CleanPass.of(self.backend.run(plan_clean(step, sample_ids, self.clean_shard)))
        report = StepReport(step, float(clean.losses.mean()), clean.losses)
        pilot = self._pilot_round(step, sample_ids, clean.losses)
        self.fit.settle()
        report.fit_seconds = self.fit.take_seconds()
        feats, tasks = self._allocate(step, ids, sample_ids, clean, pilot, report)
        self.fit.start(step, self._fit_work(step, feats, len(sample_ids)))
        main, reduced = self._main_round(step, tasks)
        # From here the step changes state for good: apply clears this once the step is applied.
        self.committing = True
        self._telemetry(report, pilot + main, reduced)
        self._observe(ids, pilot + main)
        returned = clean.results + pilot.results + main.results
        report.queries = sum(r.forwards for r in pilot.results + main.results)
        report.bytes_returned = sum(r.nbytes for r in returned)
        report.skipped = sum(r.skipped for r in returned)
        report.seconds = time.perf_counter() - t0
        return reduced, report

    def _pilot_round(self, step: int, sample_ids: np.ndarray, losses: np.ndarray) -> Round:
        """The pilot as a round of its own (a barrier), only where the step reads its traces; otherwise its
        queries run with the main ones."""
        if not self.pilot_round:
            return Round()
        chunks = plan_pilot_chunks(sample_ids, losses, self.estimator.pilot_queries, self.shard_cost, self.unit)
        tasks = plan_pilot(step, len(self.groups), chunks)
        return Round(tasks, self.backend.run(tasks) if tasks else [])

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

    def _joint_counts(self, signals: list[np.ndarray], proxies: np.ndarray, b: int) -> list[torch.Tensor] | None:
        """``allocator.joint``: one budget over all (group, sample) cells, on clean proxies times noise widths
        where every group reads its proxy and has a width, else on each group's signal at its memory's level."""
        on_proxies = (
            self.allocator.signal == "clean"
            and None not in self.widths
            and not any(self._uses_memory(g, proxies) for g in range(len(signals)))
        )
        return scaled_joint_counts(
            [torch.from_numpy(s) for s in signals],
            self.widths if on_proxies else None,
            [self.memory.group_mean(g) for g in range(len(self.groups))],
            [cfg.queries_per_sample * b for cfg in self.groups],
            self.minimum,
            self.unit,
        )

    def _allocate(
        self, step: int, ids: torch.Tensor, sample_ids: np.ndarray, clean: CleanPass, pilot: Round, report: StepReport
    ) -> tuple[list[AllocationFeatures], list[ShardTask]]:
        """Every group's counts from its trace signal, and its main tasks; the counts, the traces read and the
        predicted variance ratio go in ``report``.

        Returns:
            Per group, the features the allocation read (the fit reads them too), and the main tasks of all groups.
        """
        b, pilot_queries = len(sample_ids), self.estimator.pilot_queries
        feats, tasks = [], []
        signals = [self._signal(g, ids, clean.proxies, pilot.traces(g, b)[0]) for g in range(len(self.groups))]
        joint = self.allocator.joint and self._joint_counts(signals, clean.proxies, b)
        for g, cfg in enumerate(self.groups):
            traces = signals[g]
            feats.append(AllocationFeatures(torch.from_numpy(traces), torch.from_numpy(clean.losses), clean.embeddings))
            ta = time.perf_counter()
            gen = generator(self.root_seed, STREAM_ALLOC, step, g)
            total = cfg.queries_per_sample * b
            if joint:
                counts = joint[g].numpy()
            else:
                counts = self.allocators[g].allocate(feats[g], total, self.minimum, self.unit, gen).numpy()
            report.allocator_seconds += time.perf_counter() - ta
            report.counts.append(counts)
            report.traces.append(traces)
            used = counts if self.reuse_pilot else counts - pilot_queries
            report.variance_ratio.append(variance_ratio(traces, used, total / b))
            # Per-sample traces of the main queries cost step time: only a memory read, the joint allocation and
            # the telemetry's measured steps need them.
            every = self.estimator.telemetry_every
            telemetry = bool(every and step % every == 0)
            feed = self._uses_memory(g, clean.proxies) or telemetry or self.allocator.joint
            tasks += plan_main(
                step,
                g,
                counts,
                sample_ids,
                clean.losses,
                pilot_queries,
                self.shard_cost,
                self.unit,
                self.reuse_pilot,
                feed,
            )
        return feats, tasks

    def _fit_work(self, step: int, feats: list[AllocationFeatures], b: int) -> list[FitWork]:
        """The allocator fit's work for the next step: each group's features, budget, floor and fit stream."""
        return [
            (feats[g], cfg.queries_per_sample * b, self.minimum, generator(self.root_seed, STREAM_ALLOC_FIT, step, g))
            for g, cfg in enumerate(self.groups)
        ]

    def _main_round(self, step: int, tasks: list[ShardTask]) -> tuple[Round, Reduced]:
        """Run the main tasks and reduce them; a failure or a non-finite estimate drops the step's allocator fit."""
        try:
            main = Round(tasks, self.backend.run(tasks))
            reduced = self.backend.reduce(main.tasks, main.results, self.sizes)
            bad = [cfg.name for cfg, ok in zip(self.groups, reduced.finite) if not ok]
            if bad:
                raise FloatingPointError(f"step {step}: the gradient estimate of groups {bad} is not finite")
        except BaseException:
            self.fit.discard()
            raise
        return main, reduced

    def _telemetry(self, report: StepReport, visit: Round, reduced: Reduced) -> None:
        """Per group: the realised variance ratio and the SNR from the traces the step's queries measured, and the
        cosine to the previous step's estimate where the driver sees the estimates (``report``'s fields)."""
        b = len(report.losses)
        for g, cfg in enumerate(self.groups):
            measured = filled(visit.traces(g, b)[0], report.traces[g])
            used = report.counts[g] if self.reuse_pilot else report.counts[g] - self.estimator.pilot_queries
            report.realised_variance_ratio.append(variance_ratio(measured, used, cfg.queries_per_sample))
            grad = reduced.grads[g] if reduced.grads is not None else None
            norm = (
                reduced.norms[g] if reduced.norms is not None else np.linalg.norm(grad) if grad is not None else np.nan
            )
            report.snr.append(signal_to_noise(float(norm), measured, used))
            previous, self._previous[g] = self._previous.get(g), grad
            report.cosine.append(reduced.cosines[g] if reduced.cosines is not None else cosine(grad, previous))

    def _observe(self, ids: torch.Tensor, visit: Round) -> None:
        """Every query of the visit informs the trace memory, for later steps only."""
        for g in range(len(self.groups)):
            traces, dof = visit.traces(g, len(ids))
            self.memory.observe(g, ids, torch.from_numpy(traces), torch.from_numpy(dof))

    def apply(self) -> tuple[float, ...]:
        norms = self.backend.apply()
        self.committing = False
        return norms

    def settle(self) -> None:
        self.fit.settle()

    def discard(self) -> None:
        self.fit.discard()

    def copy_to(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        state = self.backend.state()
        with torch.no_grad():
            unflatten_into(torch.tensor(state.params, dtype=params[0].dtype), params)
        optimizer.load_state_dict(state.optimizer)

    def load_state(self, state: ReplicaState) -> None:
        self.backend.load_state(state)

    def close(self) -> None:
        self.backend.close()


def variance_ratio(traces: np.ndarray, used: np.ndarray, equal: float) -> float:
    """``J(A) / J(equal)``: the estimate's predicted variance against equal allocation of the same budget
    (Theorem 1: ``J(A) = sum_j T_j / A_j``), on the traces the allocator read; NaN without traces."""
    if not np.isfinite(traces).all() or traces.sum() <= 0:
        return float("nan")
    return float((traces / used).sum() / (traces.sum() / equal))
