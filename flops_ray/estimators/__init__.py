"""Estimator families behind one protocol, registered by ``estimator.kind`` (docs/DESIGN.md section 1).

A new family is one module here with a class decorated by :func:`register_estimator`, plus its
import below.
"""

from flops_ray.estimators import box, lr, params  # noqa: F401  (importing registers the families)
from flops_ray.estimators.base import Estimator, Evaluation, RowPlan, Shard
from flops_ray.estimators.registry import (
    BLACKBOX_ESTIMATORS,
    ESTIMATORS,
    create_estimator,
    estimator_family,
    queries_per_draw,
    register_estimator,
    terms_need_activations,
)

__all__ = [
    "BLACKBOX_ESTIMATORS",
    "ESTIMATORS",
    "Estimator",
    "Evaluation",
    "RowPlan",
    "Shard",
    "create_estimator",
    "estimator_family",
    "queries_per_draw",
    "register_estimator",
    "terms_need_activations",
]
