"""The estimator registry: families register under the ``estimator.kind`` names they serve (timm's pattern).

A family is a class; :func:`create_estimator` binds one to a model's layer group. A black box
(:class:`~flops_ray.models.blackbox.BlackBox`) answers losses only, so its family is chosen by the model.
The traits the rest of the system asks of a kind (how many queries share a draw, whether its terms depend
on activations) are asked here, of the family that serves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from flops_ray.config.estimator import EstimatorConfig
from flops_ray.config.registry import Registry
from flops_ray.config.validation import ConfigError
from flops_ray.models.blackbox import BlackBox
from flops_ray.models.groups import ResolvedGroup
from flops_ray.models.losses import LossFn

if TYPE_CHECKING:
    from flops_ray.estimators.base import Estimator

ESTIMATORS: Registry[type[Estimator]] = Registry("estimator.kind")
"""``estimator.kind`` -> the family serving it for ordinary models."""
BLACKBOX_ESTIMATORS: Registry[type[Estimator]] = Registry("estimator.kind")
"""``estimator.kind`` -> the family serving it for a :class:`~flops_ray.models.blackbox.BlackBox`."""


def register_estimator(*kinds: str, blackbox: bool = False) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator registering a family under ``kinds`` (for black boxes when ``blackbox``)."""
    return (BLACKBOX_ESTIMATORS if blackbox else ESTIMATORS).register(*kinds)


def queries_per_draw(cfg: EstimatorConfig) -> int:
    """Queries sharing one noise draw under ``cfg`` (2 for antithetic pairs, else 1)."""
    return ESTIMATORS[cfg.kind].queries_per_draw(cfg)


def terms_need_activations(cfg: EstimatorConfig) -> bool:
    """Whether ``cfg.kind``'s gradient terms depend on activations, not only on their seeds."""
    return ESTIMATORS[cfg.kind].terms_need_activations


def estimator_family(cfg: EstimatorConfig, model: nn.Module) -> type[Estimator]:
    """The family serving ``cfg.kind`` for ``model``.

    Raises:
        ConfigError: no family serves this kind for this model (e.g. LR on a black box).
    """
    if not isinstance(model, BlackBox):
        return ESTIMATORS[cfg.kind]
    if cfg.kind not in BLACKBOX_ESTIMATORS:
        known = " or ".join(BLACKBOX_ESTIMATORS)
        raise ConfigError(
            f"estimator.kind: a BlackBox is queried through its losses only; use {known}, got {cfg.kind!r}"
        )
    return BLACKBOX_ESTIMATORS[cfg.kind]


def create_estimator(cfg: EstimatorConfig, model: nn.Module, group: ResolvedGroup, loss_fn: LossFn) -> Estimator:
    """The family serving ``cfg.kind`` for ``model``, bound to ``group``."""
    return estimator_family(cfg, model)(model, group, cfg, loss_fn)
