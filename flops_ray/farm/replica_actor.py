"""The replica actor: a :class:`~flops_ray.replica.replica.Replica` inside a Ray actor, plus the collective sum.

The model arrives once, at construction. From then on the parameters never travel: each step the driver
broadcasts the batch (one ``ray.put``), the replicas evaluate shards, and every replica applies the same
:class:`~flops_ray.messages.StepUpdate` to its own copy. A replica that joins later copies the state of a
live peer, replica to replica through the object store.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch import nn

from flops_ray.messages import ReplicaState, ShardResult, ShardTask, StepUpdate, TaskKey
from flops_ray.replica.ordered_sum import ordered_sums
from flops_ray.replica.replica import Replica, ReplicaSpec
from flops_ray.replica.threads import replica_threads


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
class ReplicaOptions:
    """Per-replica knobs that are not part of the training maths."""

    slowdown: float = 1.0
    """Make this replica ``slowdown`` times slower by sleeping after each shard (benchmarks and tests
    of load balancing use it to stand in for a slower device; 1.0 is full speed)."""


@dataclass(frozen=True)
class ReplicaInfo:
    """Where a replica landed."""

    node_id: str
    gpu_ids: tuple[str, ...]
    device: str
    threads: int


@dataclass(frozen=True)
class ReplicaStats:
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
    cosines: tuple[float, ...]
    """Per group, the cosine between the sums and the last sums the replica applied (NaN: none)."""


@ray.remote(max_restarts=0)
class ReplicaActor:
    """A :class:`~flops_ray.replica.replica.Replica` as a Ray actor: it picks its device and threads, times its
    work, and joins the collective sums of the all-reduce.

    Args:
        model: the model (resolved from one object-store copy shared by every replica).
        spec: what the replica is built from (:meth:`ReplicaSpec.of` the run's configuration).
        options: per-replica knobs.
    """

    def __init__(self, model: nn.Module, spec: ReplicaSpec, options: ReplicaOptions):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(replica_threads(cpus))
        gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPU, so it is always cuda:0 in here.
        device = "cuda:0" if gpu_ids and torch.cuda.is_available() else "cpu"
        self.replica = Replica(model, spec, device)
        self.options = options
        self.info = ReplicaInfo(ray.get_runtime_context().get_node_id(), gpu_ids, device, torch.get_num_threads())
        self._tasks = self._forwards = 0
        self._busy = self._updating = 0.0

    def describe(self) -> ReplicaInfo:
        return self.info

    def stats(self) -> ReplicaStats:
        return ReplicaStats(self._tasks, self._forwards, self._busy, self._updating)

    def sync(self, batch: StepBatch, version: int) -> int:
        """Load the step's batch (see :meth:`Replica.sync`); the replica must hold the parameters after
        ``version`` updates."""
        self.replica.sync(batch.step, batch.x, batch.y, version)
        return batch.step

    def run(self, task: ShardTask, keep: bool, coefficients: bool = False) -> ShardResult:
        """Evaluate ``task`` (see :meth:`Replica.run`), timed for the scheduler and the stats."""
        t0 = time.perf_counter()
        result = self.replica.run(task, keep, coefficients)
        if self.options.slowdown > 1.0:
            time.sleep((self.options.slowdown - 1.0) * (time.perf_counter() - t0))
        result.seconds = time.perf_counter() - t0
        self._tasks += 1
        self._forwards += result.forwards
        self._busy += result.seconds
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
            "nccl" if self.replica.device.type == "cuda" else "gloo",
            init_method=f"tcp://{address[0]}:{address[1]}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )

    def close_group(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def allreduce(self, layout: tuple[tuple[TaskKey, ...], ...]) -> ReduceReply:
        """Sum the kept partials of every member in task order (:func:`ordered_sums`; float32 partials on the
        wire, a float64 sum); every member keeps the sum.

        Args:
            layout: per member, in rank order, the keys of the partials the driver accepted from it.
        """
        partials = self.replica.partials()
        device = self.replica.device
        grads = ordered_sums(self.replica.sizes, layout, dist.get_rank(), partials, _all_gather, _all_to_all, device)
        norms = self.replica.hold_reduced(grads)
        return ReduceReply(tuple(partials), norms, self.replica.cosines())

    def replay(self, update: StepUpdate) -> ReduceReply:
        """Sliced replay of the step's SPSA/ES gradient (``update`` is its ``COEFS``): this member rebuilds its share
        of the slices, gathers the others', and keeps the sums, the full replay's bits (:meth:`Replica.replay_reduced`)."""
        norms = self.replica.replay_reduced(update, dist.get_rank(), dist.get_world_size(), _all_gather)
        return ReduceReply((), norms, self.replica.cosines())

    # ---- the replica's own copy of the training state -----------------------------------------------
    def apply(self, update: StepUpdate) -> tuple[float, ...]:
        """Apply ``update`` to this replica's parameters (see :meth:`Replica.apply`); returns the group norms."""
        t0 = time.perf_counter()
        norms = self.replica.apply(update)
        self._updating += time.perf_counter() - t0
        return norms

    @ray.method(num_returns=2)
    def export_state(self) -> tuple[ReplicaState, int]:
        """This replica's parameters and optimizer state (for a joining peer, or a checkpoint), and its version
        as a second, tiny result the driver reads to learn the export happened."""
        state = self.replica.export_state()
        return state, state.version

    def adopt(self, state: ReplicaState) -> int:
        """Take over ``state`` (a peer's, or a checkpoint's); returns its version."""
        return self.replica.adopt(state)

    def digest(self) -> tuple[int, str]:
        """The version and a hash of this replica's parameters (copies that drifted hash differently)."""
        return self.replica.digest()


def _all_gather(buf: torch.Tensor) -> list[torch.Tensor]:
    """Every member's ``buf`` (one shape on all), in rank order, through the replica's process group."""
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    return out


def _all_to_all(bufs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each member's buffer for this one (in rank order), having sent ``bufs[r]`` to member ``r``."""
    out = [torch.empty_like(b) for b in bufs]
    dist.all_to_all(out, bufs)
    return out
