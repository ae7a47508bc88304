"""Start or join Ray for the farm, keeping a local instance on loopback (docs/DESIGN.md section 5).

``flops_ray.farm`` sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before ray is imported; a program that
imports ray itself first must set it in its environment.
"""

from __future__ import annotations

import math
import os
import socket
import time

import ray

from flops_ray.config import FarmConfig
from flops_ray.farm.errors import FarmError


def cluster_address(farm: FarmConfig) -> str:
    """The cluster the farm joins: ``farm.address``, else ``RAY_ADDRESS``; empty means this machine's Ray."""
    return farm.address or os.environ.get("RAY_ADDRESS", "")


def wait_reachable(address: str, timeout_s: float) -> None:
    """Return once the ``host:port`` in ``address`` accepts a TCP connection; ``auto`` and the like pass.

    ``ray.init`` itself retries an address where nothing answers forever.

    Raises:
        FarmError: nothing answered within ``timeout_s`` (the message names the address and the error).
    """
    host, sep, port = address.split("://")[-1].rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, left))):
                return
        except OSError as exc:
            if left <= 0:
                raise FarmError(
                    f"farm.address: nothing answers at {address} within {timeout_s:g} s (farm.connect_timeout_s): {exc}"
                ) from exc
            time.sleep(min(1.0, max(0.0, left)))


def init_ray(farm: FarmConfig, num_cpus: float | None = None, num_gpus: float | None = None) -> bool:
    """Connect to ``farm.address`` or start a local Ray on 127.0.0.1; a no-op if Ray is already up.

    With ``farm.address`` empty, a ``RAY_ADDRESS`` in the environment (set by ``ray job submit`` for its
    entrypoint) is joined, so a job runs on the cluster it was submitted to.

    Args:
        farm: the farm settings (``address`` empty: ``RAY_ADDRESS``, else a local instance).
        num_cpus: logical CPUs of a local instance (default: what the replicas reserve, at least the
            machine's cores, so the replicas fit).
        num_gpus: GPUs of a local instance (None lets Ray detect them; a fake count tests GPU placement).

    Returns:
        True when this call started or joined Ray, so the caller owns the ``ray.shutdown()``.
    """
    if ray.is_initialized():
        return False
    address = cluster_address(farm)
    if address:
        wait_reachable(address, farm.connect_timeout_s)
        ray.init(address=address)
        return True
    if num_cpus is None:
        num_cpus = max(os.cpu_count() or 1, farm.max_replicas * farm.num_cpus_per_replica)
    # A single local node must offer the per-replica resource, or no replica would ever be placed.
    resources = {farm.replica_resource: farm.max_replicas} if farm.replica_resource else None
    ray.init(
        num_cpus=math.ceil(num_cpus),
        num_gpus=num_gpus,
        resources=resources,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
    )
    return True
