"""Start or join Ray for the farm, keeping a local instance on loopback (docs/DESIGN.md section 5).

``flops_ray.farm`` sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before ray is imported; a program that
imports ray itself first must set it in its environment.
"""

from __future__ import annotations

import math
import os

import ray

from flops_ray.config import FarmConfig


def init_ray(farm: FarmConfig, num_cpus: float | None = None, num_gpus: float | None = None) -> bool:
    """Connect to ``farm.address`` or start a local Ray on 127.0.0.1; a no-op if Ray is already up.

    With ``farm.address`` empty, a ``RAY_ADDRESS`` in the environment (set by ``ray job submit`` for its
    entrypoint) is joined, so a job runs on the cluster it was submitted to.

    Args:
        farm: the farm settings (``address`` empty: ``RAY_ADDRESS``, else a local instance).
        num_cpus: logical CPUs of a local instance (default: what the workers reserve, at least the
            machine's cores, so the replicas fit).
        num_gpus: GPUs of a local instance (None lets Ray detect them; a fake count tests GPU placement).

    Returns:
        True when this call started or joined Ray, so the caller owns the ``ray.shutdown()``.
    """
    if ray.is_initialized():
        return False
    address = farm.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return True
    if num_cpus is None:
        num_cpus = max(os.cpu_count() or 1, farm.workers * farm.num_cpus_per_worker)
    # A single local node must offer the per-replica resource, or no replica would ever be placed.
    resources = {farm.replica_resource: farm.workers} if farm.replica_resource else None
    ray.init(
        num_cpus=math.ceil(num_cpus),
        num_gpus=num_gpus,
        resources=resources,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
    )
    return True
