"""The estimator registry: families register under the ``estimator.kind`` names they serve (timm's pattern).

A family is a class; :func:`create_estimator` binds one to a model's layer group. A black box
(:class:`~flops_ray.models.blackbox.BlackBox`) answers losses only, so its family is chosen by the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from flops_ray.models.blackbox import BlackBox
from flops_ray.config.train import ConfigError, EstimatorConfig
from flops_ray.models.groups import ResolvedGroup
from flops_ray.models.losses import LossFn

if TYPE_CHECKING:
    from flops_ray.estimators.base import Estimator

ESTIMATORS: dict[str, type[Estimator]] = {}
"""``estimator.kind`` -> the family serving it for ordinary models."""
BLACKBOX_ESTIMATORS: dict[str, type[Estimator]] = {}
"""``estimator.kind`` -> the family serving it for a :class:`~flops_ray.models.blackbox.BlackBox`."""


def register_estimator(*kinds: str, blackbox: bool = False) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator registering a family under ``kinds`` (for black boxes when ``blackbox``)."""
    table = BLACKBOX_ESTIMATORS if blackbox else ESTIMATORS

    def add(cls: type[Estimator]) -> type[Estimator]:
        for kind in kinds:
            table[kind] = cls
        return cls

    return add


def estimator_family(cfg: EstimatorConfig, model: nn.Module) -> type[Estimator]:
    """The family serving ``cfg.kind`` for ``model``.

    Raises:
        ConfigError: no family serves this kind for this model (e.g. LR on a black box).
    """
    is_box = isinstance(model, BlackBox)
    table = BLACKBOX_ESTIMATORS if is_box else ESTIMATORS
    if cfg.kind not in table:
        what = "a BlackBox is queried through its losses only; use" if is_box else "must be one of"
        raise ConfigError(f"estimator.kind: {what} {' or '.join(table)}, got {cfg.kind!r}")
    return table[cfg.kind]


def create_estimator(cfg: EstimatorConfig, model: nn.Module, group: ResolvedGroup, loss_fn: LossFn) -> Estimator:
    """The family serving ``cfg.kind`` for ``model``, bound to ``group``."""
    return estimator_family(cfg, model)(model, group, cfg, loss_fn)
