"""The Ray backend: the :class:`~flops_ray.step.backend.Backend` protocol over a farm of replica actors.

The replicas own the parameters and the optimizer; the driver plans, dispatches and sends each step's
:class:`~flops_ray.messages.StepUpdate`, whose size does not grow with ``P`` for SPSA/ES (the scalar
protocol) or LR (the all-reduce). Parameters reach the driver only when it asks for them (a checkpoint,
an evaluation), and then every replica's digest is compared first.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.exceptions import RayError
from torch import nn

from flops_ray.config import TrainConfig
from flops_ray.estimators import estimator_family
from flops_ray.estimators.noise_layout import SLICE
from flops_ray.farm.allreduce import AllReduce
from flops_ray.farm.counters import DispatchCounters
from flops_ray.farm.errors import FarmError
from flops_ray.farm.fault_budget import FaultBudget
from flops_ray.farm.fault_policy import FaultPolicy
from flops_ray.farm.placement import await_replicas, check_placement
from flops_ray.farm.ray_init import cluster_address, init_ray
from flops_ray.farm.replica_actor import ReplicaActor, ReplicaInfo, ReplicaOptions, ReplicaStats, StepBatch
from flops_ray.farm.replica_pool import ReplicaPool, ask
from flops_ray.farm.scheduler import Scheduler
from flops_ray.farm.state_transfer import export
from flops_ray.farm.update_sender import UpdateSender
from flops_ray.messages import ReplicaState, ShardResult, ShardTask, StepUpdate, UpdateSource
from flops_ray.models.groups import resolve_groups
from flops_ray.models.losses import LossFn, cross_entropy
from flops_ray.replica.replica import ReplicaSpec
from flops_ray.step.backend import reduce_in_order
from flops_ray.step.interface import Reduced


class RayBackend:
    """Shard tasks on up to ``cfg.farm.max_replicas`` replica actors, started on the Ray that ``cfg.farm`` names.

    Args:
        cfg: the run's configuration (``farm`` sets replicas, resources, dispatch and reduction).
        model: the model; it is put in the object store once and every replica loads that copy.
        loss_fn: per-sample loss (must pickle: a module-level function).
        replica_options: per-replica knobs, one per replica (default: all at full speed).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        loss_fn: LossFn = cross_entropy,
        replica_options: Sequence[ReplicaOptions] | None = None,
    ):
        farm = cfg.farm
        options = list(replica_options or [ReplicaOptions()] * farm.max_replicas)
        if len(options) != farm.max_replicas:
            raise ValueError(f"{len(options)} replica options for {farm.max_replicas} replicas")
        self._owns_ray = init_ray(farm)
        self.pool: ReplicaPool | None = None
        try:
            self._start(cfg, model, loss_fn, options)
        except BaseException:
            # A farm that failed to start must not leave replicas, nor a Ray the caller did not ask for.
            self.close()
            raise

    def _start(self, cfg: TrainConfig, model: nn.Module, loss_fn: LossFn, options: list[ReplicaOptions]) -> None:
        farm = cfg.farm
        t0 = time.perf_counter()
        # With no cluster address the farm runs on this machine's Ray, which no autoscaler can grow.
        need = check_placement(farm, local=not cluster_address(farm))
        # The closure below keeps this reference alive, so replacement replicas load the same copy.
        model_ref = ray.put(model)
        resources = {farm.replica_resource: 1} if farm.replica_resource else None
        spec = ReplicaSpec.of(cfg, loss_fn)

        def make_replica(slot: int) -> ActorHandle:
            return ReplicaActor.options(
                num_cpus=farm.num_cpus_per_replica, num_gpus=farm.num_gpus_per_replica, resources=resources
            ).remote(model_ref, spec, options[slot])

        self.counters = DispatchCounters()
        self.faults = FaultPolicy(FaultBudget(farm.max_retries), farm.stall_timeout_s)
        self.pool = ReplicaPool(make_replica, farm.max_replicas, self.faults, self.counters)
        self.replicas = await_replicas(self.pool, farm, need)
        self.startup_seconds = time.perf_counter() - t0
        self.reduction = resolve_reduction(cfg, model)
        keep, scalar = self.reduction == "allreduce", self.reduction == "scalar"
        self.sliced = scalar and resolve_replay(cfg, model)
        self.scheduler = Scheduler(
            self.pool,
            farm.in_flight,
            keep,
            coefficients=scalar,
            poison_deaths=farm.poison_deaths,
            skip_poison=farm.skip_poison,
        )
        self.sender = UpdateSender(self.pool, farm.snapshot_every)
        collective = keep or self.sliced
        self.allreduce = AllReduce(self.scheduler, self.sender, farm.collective_timeout_s) if collective else None
        self._update: StepUpdate | None = None

    def sync(self, step: int, x: np.ndarray, y: np.ndarray) -> None:
        """One ``ray.put`` of the batch, shared by every replica."""
        batch = StepBatch(step, np.ascontiguousarray(x), np.ascontiguousarray(y))
        self.pool.sync(ray.put(batch), batch.nbytes)

    def run(self, tasks: list[ShardTask]) -> list[ShardResult]:
        return self.scheduler.run(tasks)

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> Reduced:
        """Prepare the step's update: the replicas' all-reduce, the per-draw coefficients (scalar), or the
        driver's sum in canonical order."""
        version = self.pool.version
        if self.reduction == "allreduce":
            reply = self.allreduce()
            self._update = StepUpdate(version, UpdateSource.HELD)
            finite = tuple(bool(np.isfinite(n)) for n in reply.norms)
            return Reduced(finite, norms=tuple(map(float, reply.norms)), cosines=tuple(map(float, reply.cosines)))
        if self.reduction == "scalar":
            weighted = [(t, r.coefs) for t, r in zip(tasks, results) if t.weights is not None]
            finite = [True] * len(sizes)
            for task, coefs in weighted:
                finite[task.group] &= bool(np.isfinite(coefs).all())
            tasks_, coefs_ = zip(*weighted) if weighted else ((), ())
            self._update = StepUpdate(version, UpdateSource.COEFS, tasks=tuple(tasks_), coefs=tuple(coefs_))
            if not self.sliced:
                return Reduced(tuple(finite))
            reply = self.allreduce.replay(self._update)
            self._update = StepUpdate(version, UpdateSource.HELD)
            return Reduced(
                tuple(finite), norms=tuple(map(float, reply.norms)), cosines=tuple(map(float, reply.cosines))
            )
        grads = tuple(reduce_in_order(tasks, results, sizes))
        self._update = StepUpdate(version, UpdateSource.GRADS, grads=grads)
        return Reduced(tuple(bool(np.isfinite(g).all()) for g in grads), grads)

    def apply(self) -> tuple[float, ...]:
        """Send the step's update to every replica holding the current parameters: the all-reduce's members
        apply the sum they hold (:meth:`AllReduce.apply`, which recovers from its own faults), the others get
        the update from the driver (:meth:`UpdateSender.apply`).

        Replicas that fail applying it (they die, raise, or hang past ``farm.stall_timeout_s``) are replaced;
        their successors, and replicas placed during the step, adopt the new state before their next step.

        Raises:
            FarmError: every replica failed to apply it (and, all-reduce, none died: a replica that raises).
        """
        update, self._update = self._update, None
        if update is None:
            raise RuntimeError("no reduced gradient to apply: call reduce first")
        self.counters.bytes_sent += len(pickle.dumps(update))
        held = update.source == UpdateSource.HELD
        answers = self.allreduce.apply(update) if held else self.sender.apply(update)
        # The update is applied: the step made progress, so replacing the failed ones below cannot fail it.
        self.faults.progress()
        self.pool.replace_failed(answers, "a replica failed applying the step's update or exporting its state")
        # Every replica that applied it clipped the same sum: any one's norms are the step's (a replica that had
        # applied it already, before a fault, answers an empty tuple).
        return next((answer for _, answer in answers if isinstance(answer, tuple) and answer), ())

    def state(self) -> ReplicaState:
        """The parameters and optimizer state, from one replica, after checking every replica's digest.

        Replicas found dead (or failing) on the way are replaced; with none left, the current snapshot serves
        (a checkpoint written after a failed step still gets the parameters).

        Raises:
            FarmError: replicas hold different parameters (they drifted: the run cannot continue exactly), or
                no live replica and no snapshot holds the current parameters.
        """
        digests = self.digests()
        if len(set(digests)) > 1:
            raise FarmError(f"replicas' parameters drifted apart: (version, digest) per replica {digests}")
        for slot in self.pool.current():
            snapshot = export(slot.handle, self.pool.version)
            try:
                state = ray.get(snapshot.state, timeout=self.faults.stall_timeout)
            except RayError as exc:
                self.pool.replace(slot, "a replica failed exporting its state", exc)
                continue
            self.pool.keep_snapshot(snapshot)
            return state
        ref = self.pool.current_snapshot()
        if ref is None:
            raise FarmError(f"no live replica holds the parameters after update {self.pool.version}")
        return ray.get(ref, timeout=self.faults.stall_timeout)

    def load_state(self, state: ReplicaState) -> None:
        self.pool.load_state(state)

    def digests(self) -> list[tuple[int, str]]:
        """``(version, digest)`` of every live replica holding the current parameters (the dead are replaced)."""
        answers = ask(self.pool.current(), lambda h: h.digest.remote(), self.faults.stall_timeout)
        self.pool.replace_failed(answers, "a replica failed reporting its digest")
        return [answer for _, answer in answers if not isinstance(answer, RayError)]

    def describe(self) -> list[ReplicaInfo]:
        """Where each replica runs (node, GPU ids, torch device); a slot waiting out a backoff has none."""
        return ray.get([slot.handle.describe.remote() for slot in self.pool.slots if slot.handle is not None])

    def replica_stats(self) -> list[ReplicaStats]:
        """What each replica did since it started (tasks, forwards, busy and update seconds), in slot order."""
        return ray.get([slot.handle.stats.remote() for slot in self.pool.slots])

    def run_pinned(self, tasks: list[ShardTask], replica_of: Callable[[ShardTask], int]) -> list[ShardResult]:
        """Run every task at once on replica ``replica_of(task)``, past the scheduler, with no retries: a static
        assignment the benchmarks compare the scheduler with."""
        handles = [slot.handle for slot in self.pool.slots]
        return ray.get([handles[replica_of(t)].run.remote(t, False) for t in tasks])

    def where(self) -> str:
        """One line saying where the queries run: ``2 of 2 replicas ready on cpu in 4.1 s (Ray at ...)``."""
        # Inside a replica its GPU is always cuda:0; the GPU ids say which of the node's it is.
        devices = sorted(
            {f"cuda:{','.join(i.gpu_ids)}" if i.device.startswith("cuda") else "cpu" for i in self.replicas}
        )
        return (
            f"{len(self.replicas)} of {len(self.pool.slots)} replicas ready on {', '.join(devices)} "
            f"in {self.startup_seconds:.1f} s (Ray at {ray.get_runtime_context().gcs_address})"
        )

    def close(self) -> None:
        """Kill the replicas, and shut Ray down if this backend started it."""
        if self.pool is not None:
            self.pool.close()
        if self._owns_ray:
            ray.shutdown()


def resolve_replay(cfg: TrainConfig, model: nn.Module) -> bool:
    """Whether the scalar protocol replays sliced (``farm.replay``; ``auto``: two or more replicas and trained
    parameters spanning four canonical slices)."""
    if cfg.farm.replay != "auto":
        return cfg.farm.replay == "sliced"
    trained = sum(g.size for g in resolve_groups(model, cfg.groups, False))  # SPSA/ES: whole modules
    return cfg.farm.max_replicas >= 2 and trained >= 4 * SLICE


def resolve_reduction(cfg: TrainConfig, model: nn.Module) -> str:
    """``farm.reduction`` with ``auto`` resolved: ``scalar`` for a family whose terms are seeds times
    coefficients (SPSA/ES), else ``allreduce``."""
    if cfg.farm.reduction != "auto":
        return cfg.farm.reduction
    family = estimator_family(cfg.estimator, model)
    # LR's terms (activations, or a black box's projected noise W eps) cannot be rebuilt from seeds.
    return "allreduce" if family.linear_outputs or family.terms_need_activations else "scalar"
