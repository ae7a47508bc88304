"""flops_ray: forward-only training with optimal query allocation (FLOPS, ICLR 2025) on a Ray query farm.

The public API, imported lazily so that ``import flops_ray`` (and the ``flops-ray`` command) stays fast:

>>> from flops_ray import TrainConfig, FarmConfig
>>> TrainConfig(farm=FarmConfig(replicas=4)).farm.replicas
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
    "JobConfig": "flops_ray.config",
    "TrainConfig": "flops_ray.config",
    "config_from_dict": "flops_ray.config.plain",
    "BlackBox": "flops_ray.models.blackbox",
    "BlackBoxError": "flops_ray.models.blackbox",
    "ModuleLoss": "flops_ray.models.blackbox",
    "create_allocator": "flops_ray.allocation.allocators",
    "register_allocator": "flops_ray.allocation.allocators",
    "create_estimator": "flops_ray.estimators",
    "register_estimator": "flops_ray.estimators",
    "create_model": "flops_ray.models.factory",
    "register_model": "flops_ray.models.factory",
    "ArrayDataset": "flops_ray.data.arrays",
    "digits": "flops_ray.data.arrays",
    "cross_entropy": "flops_ray.models.losses",
    "completion_loss": "flops_ray.models.losses",
    "CausalLMScorer": "flops_ray.models.causal_lm",
    "load_causal_lm": "flops_ray.models.hf",
    "QueryEngine": "flops_ray.replica.engine",
    "StepReport": "flops_ray.step.interface",
    "Trainer": "flops_ray.training.trainer",
    "start_driver": "flops_ray.training.driver",
    "load_config": "flops_ray.app.job_config",
    "train": "flops_ray.app.run",
    "tune": "flops_ray.app.tune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flops_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
