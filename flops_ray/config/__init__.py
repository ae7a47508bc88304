"""Configuration as data: frozen, typed dataclasses with a docstring per field, each section checking its values.

Nothing here knows the registries: the rules that need them (kind names, pilot and budget rules) are
:func:`flops_ray.step.checks.check_config`, which ``load_config`` and the trainer call.
"""

from flops_ray.config.allocator import SIGNALS, AllocatorConfig
from flops_ray.config.data import DataConfig
from flops_ray.config.estimator import NOISE_LAWS, PRECISIONS, EstimatorConfig
from flops_ray.config.farm import FarmConfig
from flops_ray.config.group import GroupConfig, default_groups
from flops_ray.config.job import JobConfig
from flops_ray.config.lora import LoraSettings
from flops_ray.config.registry import Registry, UnknownNameError
from flops_ray.config.train import OPTIMIZERS, TrainConfig, UpdateRule
from flops_ray.config.validation import ConfigError, require

__all__ = [
    "NOISE_LAWS",
    "OPTIMIZERS",
    "PRECISIONS",
    "SIGNALS",
    "AllocatorConfig",
    "ConfigError",
    "DataConfig",
    "EstimatorConfig",
    "FarmConfig",
    "GroupConfig",
    "JobConfig",
    "LoraSettings",
    "Registry",
    "TrainConfig",
    "UnknownNameError",
    "UpdateRule",
    "default_groups",
    "require",
]
