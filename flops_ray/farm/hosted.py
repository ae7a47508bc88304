"""Run any object inside a Ray actor next to the farm, so a thin client can drive it and disconnect.

The object's public methods become the actor's (``handle.fit.remote(10)``). The training layer uses it
to host the trainer (:func:`flops_ray.training.driver.start_driver`); nothing here knows what it hosts.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.actor import ActorHandle

from flops_ray.config import FarmConfig
from flops_ray.farm.ray_init import init_ray

Hosted = ActorHandle
"""A handle on a hosted object: call its methods with ``.remote(...)`` and ``ray.get`` the results."""


def start_hosted(cls: type, farm: FarmConfig, *args: Any, **kwargs: Any) -> Hosted:
    """Start (or join) Ray as ``farm`` says and build ``cls(*args, **kwargs)`` inside an actor.

    The actor mostly waits on replicas, so it reserves no CPU: every core stays with them.
    """
    init_ray(farm)
    return ray.remote(num_cpus=0, max_restarts=0)(cls).remote(*args, **kwargs)
