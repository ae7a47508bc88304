"""Configuration as data: frozen, typed dataclasses with a docstring per field, checked field by field.

Nothing here knows the registries: the rules that need them (kind names, pilot and budget rules) live in
:mod:`flops_ray.step.checks`, which ``load_config`` and the trainer call.
"""

from flops_ray.config.data import DataConfig
from flops_ray.config.farm import FarmConfig
from flops_ray.config.train import AllocatorConfig, EstimatorConfig, GroupConfig, TrainConfig
from flops_ray.config.validation import ConfigError, require

__all__ = [
    "AllocatorConfig",
    "ConfigError",
    "DataConfig",
    "EstimatorConfig",
    "FarmConfig",
    "GroupConfig",
    "TrainConfig",
    "require",
]
