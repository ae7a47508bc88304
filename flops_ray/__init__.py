"""flops_ray: forward-only training with optimal query allocation (FLOPS, ICLR 2025) on a Ray query farm.

The public API, imported lazily so that ``import flops_ray`` (and the ``flops-ray`` command) stays fast:

>>> from flops_ray import TrainConfig, FarmConfig
>>> TrainConfig(farm=FarmConfig(workers=4)).farm.workers
4
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AllocatorConfig": "flops_ray.config",
    "ConfigError": "flops_ray.config",
    "DataConfig": "flops_ray.config",
    "EstimatorConfig": "flops_ray.config",
    "FarmConfig": "flops_ray.config",
    "GroupConfig": "flops_ray.config",
    "TrainConfig": "flops_ray.config",
    "config_from_dict": "flops_ray.config_dict",
    "BlackBox": "flops_ray.blackbox",
    "BlackBoxError": "flops_ray.blackbox",
    "ModuleLoss": "flops_ray.blackbox",
    "create_allocator": "flops_ray.allocators",
    "register_allocator": "flops_ray.allocators",
    "create_estimator": "flops_ray.estimators",
    "register_estimator": "flops_ray.estimators",
    "create_model": "flops_ray.models",
    "register_model": "flops_ray.models",
    "ArrayDataset": "flops_ray.data",
    "digits": "flops_ray.data",
    "cross_entropy": "flops_ray.losses",
    "QueryEngine": "flops_ray.engine",
    "StepReport": "flops_ray.step",
    "Trainer": "flops_ray.trainer",
    "start_driver": "flops_ray.driver",
    "load_config": "flops_ray.job_config",
    "train": "flops_ray.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flops_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
