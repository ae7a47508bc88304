"""The Ray farm as the benchmarks start and probe it: replicas at set speeds, their own counters, pinned shards.

This is the one place where a study reaches past the backend's step protocol into its replicas (the farm's
pool of replica actors), which no training run needs; when the farm's internals change, only this file
follows them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from flops_ray.config import FarmConfig, TrainConfig
from flops_ray.farm.backend import RayBackend
from flops_ray.farm.costs import call_costs
from flops_ray.farm.ray_init import init_ray
from flops_ray.farm.replica_actor import ReplicaOptions, ReplicaStats
from flops_ray.messages import ShardResult, ShardTask

__all__ = ["call_costs", "replica_stats", "run_pinned", "start_farm", "start_ray", "wire_bytes"]


def start_ray(replicas: int, num_cpus: float | None = None) -> None:
    """Start (or join) this machine's Ray with room for ``replicas`` replicas (``num_cpus``: that many CPUs instead)."""
    init_ray(FarmConfig(replicas=replicas), num_cpus=num_cpus)


def start_farm(cfg: TrainConfig, model: nn.Module, slowdowns: Sequence[float] = ()) -> RayBackend:
    """The farm ``cfg.farm`` describes, serving ``model``; replica ``i`` runs ``slowdowns[i]`` times slower than
    it can (none given: every replica at full speed)."""
    options = [ReplicaOptions(slowdown=s) for s in slowdowns] or None
    return RayBackend(cfg, model, replica_options=options)


def replica_stats(backend: RayBackend) -> list[ReplicaStats]:
    """What each replica did since it started (tasks, forwards, busy and update seconds), in the pool's order."""
    return _values([handle.stats.remote() for handle in _handles(backend)])


def run_pinned(
    backend: RayBackend, tasks: list[ShardTask], replica_of: Callable[[ShardTask], int]
) -> list[ShardResult]:
    """Send every task at once to replica ``replica_of(task)``, past the scheduler (a static assignment), and wait
    for all of them; no retries."""
    handles = _handles(backend)
    return _values([handles[replica_of(t)].run.remote(t, False) for t in tasks])


def _handles(backend: RayBackend) -> list:
    return [slot.handle for slot in backend.pool.slots]


def _values(refs: list) -> list:
    # Through the references' futures: only the farm's modules import ray (tests/test_layout.py).
    return [future.result() for future in [ref.future() for ref in refs]]


def wire_bytes(backend: RayBackend) -> int:
    """Bytes the driver has sent to and received from the replicas so far."""
    counters = backend.counters
    return counters.bytes_sent + counters.bytes_returned
