"""Where replicas can go: the resources each asks for against the cluster's nodes, checked before step 0.

An actor asking for resources no node has stays pending without an error, so the farm checks first:
a local Ray that cannot hold a single replica fails at once, naming the resource; a joined cluster may
be autoscaling, so there the farm waits (``farm.stall_timeout_s``) and then names what is missing.

>>> nodes = [{"CPU": 2.0, "memory": 1e9}]
>>> replicas_that_fit({"CPU": 1.0}, nodes), replicas_that_fit({"CPU": 1.0, "GPU": 1.0}, nodes)
(2, 0)
>>> shortfall({"CPU": 1.0, "GPU": 1.0}, nodes)
'each replica asks for GPU 1 but no node has more than 0'
"""

from __future__ import annotations

import math
import os
import time
import warnings

import ray
from ray.exceptions import RayActorError

from flops_ray.config import FarmConfig
from flops_ray.farm.errors import FarmError
from flops_ray.farm.replica_pool import ReplicaPool


def replica_demand(farm: FarmConfig) -> dict[str, float]:
    """The Ray resources one replica actor asks for (only the non-zero ones)."""
    demand = {"CPU": farm.num_cpus_per_replica, "GPU": farm.num_gpus_per_replica}
    if farm.replica_resource:
        demand[farm.replica_resource] = 1.0
    return {name: amount for name, amount in demand.items() if amount > 0}


def replicas_that_fit(demand: dict[str, float], nodes: list[dict[str, float]]) -> int | float:
    """How many replicas the nodes' total resources hold (``inf`` when a replica asks for nothing)."""
    if not demand:
        return math.inf
    return sum(min(math.floor(node.get(r, 0.0) / d + 1e-9) for r, d in demand.items()) for node in nodes)


def shortfall(demand: dict[str, float], nodes: list[dict[str, float]]) -> str:
    """Why a replica fits no node: the first resource no node has enough of (or the combination)."""
    for name, amount in demand.items():
        most = max((node.get(name, 0.0) for node in nodes), default=0.0)
        if most < amount:
            return f"each replica asks for {name} {amount:g} but no node has more than {most:g}"
    return f"each replica asks for {_text(demand)} and no single node has all of it"


def _text(resources: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in resources.items())


def _alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def check_placement(farm: FarmConfig, local: bool) -> int:
    """Before any replica starts: fail or warn when the cluster cannot hold ``farm.max_replicas`` replicas.

    Args:
        farm: the farm settings.
        local: Ray is this machine's own (no autoscaler can add a node).

    Returns:
        How many replicas to wait for before step 0: those the current nodes hold, at least one (an elastic
        range: at least its minimum).

    Raises:
        FarmError: a local Ray cannot hold even one replica (the message names the resource).
    """
    demand, nodes = replica_demand(farm), _alive_nodes()
    fit = replicas_that_fit(demand, nodes)
    if fit == 0 and local:
        raise FarmError(f"no replica can be placed on this machine's Ray: {shortfall(demand, nodes)}")
    if fit == 0:
        warnings.warn(
            f"no current node can hold a replica ({shortfall(demand, nodes)}); waiting up to "
            f"{farm.stall_timeout_s:.0f} s (farm.stall_timeout_s) for the autoscaler to add one",
            RuntimeWarning,
            stacklevel=2,
        )
    elif fit < farm.max_replicas:
        warnings.warn(
            f"the cluster's nodes hold {fit} of the {farm.max_replicas} replicas asked for (each asks for "
            f"{_text(demand)}); the rest wait for resources",
            RuntimeWarning,
            stacklevel=2,
        )
    cores = os.cpu_count() or 1
    if local and farm.max_replicas * farm.num_cpus_per_replica > cores:
        warnings.warn(
            f"{farm.max_replicas} replicas x {farm.num_cpus_per_replica:g} CPU on a machine with {cores} cores: "
            "they share the cores and each runs slower",
            RuntimeWarning,
            stacklevel=2,
        )
    # A fixed count starts on the replicas that fit (the rest join later); a range waits for its minimum.
    return max(farm.min_replicas if farm.elastic else 1, min(farm.max_replicas, fit))


def await_replicas(pool: ReplicaPool, farm: FarmConfig, need: int) -> list:
    """Wait up to ``farm.stall_timeout_s`` for ``need`` replicas to answer ``describe``; the rest join later.

    Returns:
        The :class:`~flops_ray.farm.replica_actor.ReplicaInfo` of every replica that came up.

    Raises:
        FarmError: no replica came up (the message names the resources asked for and those there are).
    """
    refs = [slot.handle.describe.remote() for slot in pool.slots]
    start = time.monotonic()
    ready, pending = ray.wait(refs, num_returns=need, timeout=farm.stall_timeout_s)
    if not ready:
        raise FarmError(
            f"no replica started within {farm.stall_timeout_s:.0f} s (farm.stall_timeout_s): each asks for "
            f"{_text(replica_demand(farm))}; the cluster has {_text(ray.cluster_resources())}"
        )
    if pending:
        more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        ready += more
    if len(ready) < need:
        warnings.warn(
            f"{len(ready)} of {len(refs)} replicas started in {time.monotonic() - start:.0f} s; the rest still "
            f"wait for resources (each asks for {_text(replica_demand(farm))}) and join when placed",
            RuntimeWarning,
            stacklevel=2,
        )
    infos = []
    for ref in ready:
        try:
            infos.append(ray.get(ref))
        except RayActorError as exc:
            if exc.actor_init_failed:
                # The constructor raised: a bug every replacement would repeat. Its exception ends Ray's message.
                lines = [line for line in str(exc).splitlines() if line.strip()]
                raise FarmError(f"a replica failed to start: {lines[-1].strip() if lines else exc!r}") from exc
            # Lost while starting (a preempted node): the scheduler replaces it at its first sync.
    return infos
