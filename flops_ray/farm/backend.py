"""The Ray backend: the :class:`~flops_ray.step.Backend` protocol over a farm of replica actors."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import ray
from ray.actor import ActorHandle
from torch import nn

from flops_ray.config import TrainConfig
from flops_ray.farm.allreduce import AllReduce
from flops_ray.farm.counters import DispatchCounters
from flops_ray.farm.fault_budget import FaultBudget
from flops_ray.farm.placement import await_replicas, check_placement
from flops_ray.farm.ray_init import cluster_address, init_ray
from flops_ray.farm.replica_pool import ReplicaPool
from flops_ray.farm.scheduler import Scheduler
from flops_ray.farm.worker import StepBatch, Worker, WorkerInfo, WorkerOptions
from flops_ray.losses import LossFn, cross_entropy
from flops_ray.messages import ShardResult, ShardTask
from flops_ray.step import reduce_in_order


class RayBackend:
    """Shard tasks on ``cfg.farm.workers`` replica actors, started on the Ray that ``cfg.farm`` names.

    Args:
        cfg: the run's configuration (``farm`` sets replicas, resources, dispatch and reduction).
        model: the model; it is put in the object store once and every replica loads that copy.
        loss_fn: per-sample loss (must pickle: a module-level function).
        worker_options: per-replica knobs, one per worker (default: all at full speed).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        loss_fn: LossFn = cross_entropy,
        worker_options: Sequence[WorkerOptions] | None = None,
    ):
        farm = cfg.farm
        options = list(worker_options or [WorkerOptions()] * farm.workers)
        if len(options) != farm.workers:
            raise ValueError(f"{len(options)} worker options for {farm.workers} workers")
        self._owns_ray = init_ray(farm)
        self.pool: ReplicaPool | None = None
        try:
            self._start(cfg, model, loss_fn, options)
        except BaseException:
            # A farm that failed to start must not leave replicas, nor a Ray the caller did not ask for.
            self.close()
            raise

    def _start(self, cfg: TrainConfig, model: nn.Module, loss_fn: LossFn, options: list[WorkerOptions]) -> None:
        farm = cfg.farm
        t0 = time.perf_counter()
        # With no cluster address the farm runs on this machine's Ray, which no autoscaler can grow.
        need = check_placement(farm, local=not cluster_address(farm))
        # The closure below keeps this reference alive, so replacement replicas load the same copy.
        model_ref = ray.put(model)
        resources = {farm.replica_resource: 1} if farm.replica_resource else None

        def make_worker(slot: int) -> ActorHandle:
            return Worker.options(
                num_cpus=farm.num_cpus_per_worker, num_gpus=farm.num_gpus_per_worker, resources=resources
            ).remote(model_ref, cfg.groups, cfg.estimator, cfg.seed, loss_fn, options[slot])

        self.counters = DispatchCounters()
        self.pool = ReplicaPool(make_worker, farm.workers, FaultBudget(farm.max_retries), self.counters)
        self.replicas = await_replicas(self.pool, farm, need)
        self.startup_seconds = time.perf_counter() - t0
        keep = farm.reduction == "allreduce"
        self.scheduler = Scheduler(self.pool, farm.in_flight, keep, farm.stall_timeout_s)
        self.allreduce = AllReduce(self.scheduler, farm.collective_timeout_s) if keep else None

    def sync(self, step: int, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """One ``ray.put`` of the ``(P,)`` parameters and one of the batch, shared by every replica."""
        params = np.ascontiguousarray(params)
        batch = StepBatch(step, np.ascontiguousarray(x), np.ascontiguousarray(y))
        self.scheduler.new_step()
        self.pool.sync(ray.put(batch), ray.put(params), params.nbytes + batch.nbytes)

    def run(self, tasks: list[ShardTask], meanwhile: Callable[[], None] | None = None) -> list[ShardResult]:
        return self.scheduler.run(tasks, meanwhile)

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> list[np.ndarray]:
        """Per-group gradient sums: in canonical order on the driver, or by the replicas' all-reduce."""
        if self.allreduce is None:
            return reduce_in_order(tasks, results, sizes)
        return self.allreduce()

    def describe(self) -> list[WorkerInfo]:
        """Where each replica runs (node, GPU ids, torch device); a slot waiting out a backoff has none."""
        return ray.get([slot.handle.describe.remote() for slot in self.pool.slots if slot.handle is not None])

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
