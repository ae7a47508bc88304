"""The Ray farm as the benchmarks start and probe it: replicas at set speeds, their own counters, pinned shards.

The benchmarks' one door to the farm beyond the backend's step protocol (per-replica counters, pinned
shards, wire bytes), which no training run needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flops_ray.config import FarmConfig, TrainConfig
from flops_ray.farm.backend import RayBackend
from flops_ray.farm.costs import call_costs
from flops_ray.farm.ray_init import init_ray
from flops_ray.farm.replica_actor import ReplicaOptions

__all__ = ["call_costs", "start_farm", "start_ray", "wire_bytes"]


def start_ray(replicas: int, num_cpus: float | None = None) -> None:
    """Start (or join) this machine's Ray with room for ``replicas`` replicas (``num_cpus``: that many CPUs instead)."""
    init_ray(FarmConfig(replicas=replicas), num_cpus=num_cpus)


def start_farm(cfg: TrainConfig, model: nn.Module, slowdowns: Sequence[float] = ()) -> RayBackend:
    """The farm ``cfg.farm`` describes, serving ``model``; replica ``i`` runs ``slowdowns[i]`` times slower than
    it can (none given: every replica at full speed)."""
    options = [ReplicaOptions(slowdown=s) for s in slowdowns] or None
    return RayBackend(cfg, model, replica_options=options)


def wire_bytes(backend: RayBackend) -> int:
    """Bytes the driver has sent to and received from the replicas so far."""
    counters = backend.counters
    return counters.bytes_sent + counters.bytes_returned
