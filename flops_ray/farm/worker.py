"""The replica actor: a :class:`~flops_ray.replica.engine.QueryEngine` and its own optimizer inside a Ray actor.

The model arrives once, at construction. From then on the parameters never travel: each step the driver
broadcasts the batch (one ``ray.put``), the replicas evaluate shards, and every replica applies the same
:class:`~flops_ray.messages.StepUpdate` to its own copy. A replica that joins later copies the state of a
live peer, replica to replica through the object store.
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

from flops_ray.config.train import EstimatorConfig, GroupConfig, UpdateRule
from flops_ray.replica.engine import QueryEngine
from flops_ray.models.groups import to_numpy
from flops_ray.models.losses import LossFn
from flops_ray.messages import (
    ReplicaState,
    ShardResult,
    ShardTask,
    StepUpdate,
    TaskKey,
    TaskKind,
    UpdateSource,
)
from flops_ray.replica.update import ParamUpdate


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
    """Seconds spent running shards."""
    update_seconds: float = 0.0
    """Seconds spent applying updates (rebuilding a scalar-protocol gradient from seeds included)."""


@dataclass(frozen=True)
class ReduceReply:
    """A replica's answer to an all-reduce: the task keys it had summed, and the norms of the sums it now holds."""

    keys: tuple[TaskKey, ...]
    norms: tuple[float, ...]
    """Per group, the L2 norm of the all-reduced gradient (not finite when the gradient is not)."""


class ReplicaStateError(RuntimeError):
    """A replica was asked for work at another version of the parameters than the one it holds."""


@ray.remote(max_restarts=0)
class Worker:
    """A model replica evaluating shard tasks (see :class:`~flops_ray.replica.engine.QueryEngine`).

    Args:
        model: the model (resolved from one object-store copy shared by every replica).
        groups: layer groups.
        estimator: estimator settings.
        root_seed: the run's root seed.
        loss_fn: per-sample loss.
        rule: the optimizer and clipping every replica applies to its own copy.
        options: per-replica knobs.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: tuple[GroupConfig, ...],
        estimator: EstimatorConfig,
        root_seed: int,
        loss_fn: LossFn,
        rule: UpdateRule,
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
        self.update = ParamUpdate([[p for _, p in g.params] for g in self.engine.groups], rule)
        self.version = 0
        self._reduced: list[torch.Tensor] | None = None
        self.options = options
        self.info = WorkerInfo(ray.get_runtime_context().get_node_id(), gpu_ids, device, torch.get_num_threads())
        self._held: list[torch.Tensor] = []
        self._held_keys: list[TaskKey] = []
        self._tasks = self._forwards = 0
        self._busy = self._updating = 0.0

    def describe(self) -> WorkerInfo:
        return self.info

    def stats(self) -> WorkerStats:
        return WorkerStats(self._tasks, self._forwards, self._busy, self._updating)

    def sync(self, batch: StepBatch, version: int) -> int:
        """Load the step's batch; forget the previous step's partial sums. The replica must hold the
        parameters after ``version`` updates (a replica that missed one adopts a peer's state first)."""
        if self.version != version:
            raise ReplicaStateError(f"replica holds update {self.version} of the parameters, step needs {version}")
        with warnings.catch_warnings():
            # Object-store arrays are read-only views; the engine copies them and never writes to them.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            self.engine.set_batch(batch.step, batch.x, batch.y)
        self._held = []  # made at the first kept partial: a scalar-protocol step never keeps one
        self._held_keys = []
        self._reduced = None
        return batch.step

    def run(self, task: ShardTask, keep: bool, coefficients: bool = False) -> ShardResult:
        """Evaluate ``task``; with ``keep`` the gradient partial stays here for the all-reduce, with
        ``coefficients`` it travels as per-draw coefficients (the scalar protocol)."""
        t0 = time.perf_counter()
        kept = keep and task.kind == TaskKind.MAIN
        result, grad = self.engine.run_on_device(task) if kept else (self.engine.run(task, coefficients), None)
        if self.options.slowdown > 1.0:
            time.sleep((self.options.slowdown - 1.0) * (time.perf_counter() - t0))
        result.seconds = time.perf_counter() - t0
        self._tasks += 1
        self._forwards += result.forwards
        self._busy += result.seconds
        if kept:
            if not self._held:
                self._held = [torch.zeros(n, dtype=torch.float64, device=self.engine.device) for n in self.sizes]
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
        """Sum the kept partials of every replica (float32 on the wire); every replica keeps the sum."""
        # (P,) a copy, so a failed collective leaves the partials intact; zeros from a replica that kept none
        if self._held:
            flat = torch.cat(self._held).float()
        else:
            flat = torch.zeros(sum(self.sizes), dtype=torch.float32, device=self.engine.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self._reduced = list(torch.split(flat.double(), self.sizes))
        norms = tuple(float(g.norm()) for g in self._reduced)
        return ReduceReply(tuple(self._held_keys), norms)

    # ---- the replica's own copy of the training state -----------------------------------------------
    def apply(self, update: StepUpdate) -> tuple[float, ...]:
        """Apply ``update`` to this replica's parameters (once: a repeat is ignored); returns the group norms."""
        if self.version == update.version + 1:
            return ()
        if self.version != update.version:
            raise ReplicaStateError(f"replica holds update {self.version}, the update applies to {update.version}")
        t0 = time.perf_counter()
        if update.source == UpdateSource.HELD:
            if self._reduced is None:
                raise ReplicaStateError("no all-reduced gradient to apply: this replica was not in the collective")
            grads = self._reduced
        elif update.source == UpdateSource.GRADS:
            grads = [torch.from_numpy(np.asarray(g)).to(self.engine.device) for g in update.grads]
        else:
            grads = self.engine.replay(update.tasks, update.coefs)
        norms = self.update.apply(grads)
        self._updating += time.perf_counter() - t0
        self.version += 1
        self._reduced = None
        return tuple(norms)

    @ray.method(num_returns=2)
    def export_state(self) -> tuple[ReplicaState, int]:
        """This replica's parameters and optimizer state (for a joining peer, or a checkpoint), and its version
        as a second, tiny result the driver reads to learn the export happened."""
        opt = _to_cpu(self.update.state_dict())
        return ReplicaState(self.version, to_numpy(self.engine.get_params()), opt), self.version

    def adopt(self, state: ReplicaState) -> int:
        """Take over ``state`` (a peer's, or a checkpoint's); returns its version."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            self.engine.set_params(state.params)
        self.update.load_state_dict(state.optimizer)
        self.version = state.version
        return self.version

    def digest(self) -> tuple[int, str]:
        """The version and a hash of this replica's parameters (copies that drifted hash differently)."""
        return self.version, self.update.digest()


def _to_cpu(obj):
    """``obj`` with every tensor in it moved to the CPU (a GPU replica's optimizer state, for a CPU reader)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
