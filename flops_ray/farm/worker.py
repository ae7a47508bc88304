"""The replica actor: a :class:`~flops_ray.engine.QueryEngine` inside a Ray actor.

The model arrives once, at construction; every step the driver side broadcasts the parameters and the
batch with one ``ray.put`` each, and the actor receives only object references to them.
"""

from __future__ import annotations

import socket
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch import nn

from flops_ray.config import EstimatorConfig, GroupConfig
from flops_ray.engine import QueryEngine
from flops_ray.losses import LossFn
from flops_ray.messages import ShardResult, ShardTask, TaskKey, TaskKind


@dataclass(frozen=True)
class StepBatch:
    """One step's inputs as broadcast to every replica: ``x (B, C, H, W)``, ``y (B,)``."""

    step: int
    x: np.ndarray
    y: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes


@dataclass(frozen=True)
class WorkerOptions:
    """Per-replica knobs that are not part of the training maths."""

    slowdown: float = 1.0
    """Make this replica ``slowdown`` times slower by sleeping after each shard (benchmarks and tests
    of load balancing use it to stand in for a slower device; 1.0 is full speed)."""


@dataclass(frozen=True)
class WorkerInfo:
    """Where a replica landed."""

    node_id: str
    gpu_ids: tuple[str, ...]
    device: str
    threads: int


@dataclass(frozen=True)
class WorkerStats:
    """What a replica did since it started (for speed calibration in benchmarks)."""

    tasks: int
    forwards: int
    busy_seconds: float


@dataclass(frozen=True)
class ReduceReply:
    """A replica's answer to an all-reduce: the task keys it had summed, and the sum on rank 0."""

    keys: tuple[TaskKey, ...]
    grads: tuple[np.ndarray, ...] | None
    """Per group ``(P_g,)`` float64 sums over all replicas (rank 0 only)."""


@ray.remote(max_restarts=0)
class Worker:
    """A model replica evaluating shard tasks (see :class:`~flops_ray.engine.QueryEngine`).

    Args:
        model: the model (resolved from one object-store copy shared by every replica).
        groups: layer groups.
        estimator: estimator settings.
        root_seed: the run's root seed.
        loss_fn: per-sample loss.
        options: per-replica knobs.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: tuple[GroupConfig, ...],
        estimator: EstimatorConfig,
        root_seed: int,
        loss_fn: LossFn,
        options: WorkerOptions,
    ):
        # Ray reserves logical CPUs only; one intra-op thread per reserved CPU avoids oversubscribing a node.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, round(cpus)))
        gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPU, so it is always cuda:0 in here.
        device = "cuda:0" if gpu_ids and torch.cuda.is_available() else "cpu"
        self.engine = QueryEngine(model, groups, estimator, root_seed, loss_fn, device)
        self.sizes = [g.size for g in self.engine.groups]
        self.options = options
        self.info = WorkerInfo(ray.get_runtime_context().get_node_id(), gpu_ids, device, torch.get_num_threads())
        self._held: list[torch.Tensor] = []
        self._held_keys: list[TaskKey] = []
        self._tasks = self._forwards = 0
        self._busy = 0.0

    def describe(self) -> WorkerInfo:
        return self.info

    def stats(self) -> WorkerStats:
        return WorkerStats(self._tasks, self._forwards, self._busy)

    def sync(self, batch: StepBatch, params: np.ndarray) -> int:
        """Load the step's ``(P,)`` parameters and batch; forget the previous step's partial sums."""
        with warnings.catch_warnings():
            # Object-store arrays are read-only views; the engine copies them and never writes to them.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            self.engine.set_params(params)
            self.engine.set_batch(batch.step, batch.x, batch.y)
        self._held = [torch.zeros(n, dtype=torch.float64, device=self.engine.device) for n in self.sizes]
        self._held_keys = []
        return batch.step

    def run(self, task: ShardTask, keep: bool) -> ShardResult:
        """Evaluate ``task``; with ``keep`` the gradient partial stays here for the all-reduce."""
        t0 = time.perf_counter()
        kept = keep and task.kind in (TaskKind.FINALIZE, TaskKind.MAIN)
        result, grad = self.engine.run_on_device(task) if kept else (self.engine.run(task), None)
        if self.options.slowdown > 1.0:
            time.sleep((self.options.slowdown - 1.0) * (time.perf_counter() - t0))
        self._tasks += 1
        self._forwards += result.forwards
        self._busy += time.perf_counter() - t0
        if kept:
            self._held[task.group] += grad  # float32 partial into the float64 sum, on the device
            self._held_keys.append(task.key)
        return result

    # ---- collective reduction -----------------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def open_group(self, rank: int, world: int, address: tuple[str, int], timeout_s: float) -> None:
        """Join a fresh process group (gloo on CPU, NCCL on GPU), leaving any previous one; a collective
        waits ``timeout_s`` for a peer that may have died."""
        self.close_group()
        dist.init_process_group(
            "nccl" if self.engine.device.type == "cuda" else "gloo",
            init_method=f"tcp://{address[0]}:{address[1]}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )

    def close_group(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def allreduce(self) -> ReduceReply:
        """Sum the kept partials of every replica; rank 0 returns the per-group sums."""
        flat = torch.cat(self._held)  # (P,) a copy, so a failed collective leaves the partials intact
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        grads = None
        if dist.get_rank() == 0:
            grads = tuple(g.cpu().numpy() for g in torch.split(flat, self.sizes))
        return ReduceReply(tuple(self._held_keys), grads)
