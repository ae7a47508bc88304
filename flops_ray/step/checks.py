"""The config rules that need the registries: kind names, the pilot and budget rules, the reduction's needs.

:mod:`flops_ray.config` checks values only; this module sits above the estimator and allocator registries
and asks them. ``load_config`` and the trainer call :func:`check_config`, so a bad YAML still fails before
any forward pass.
"""

from __future__ import annotations

from flops_ray.allocation.allocators import ALLOCATORS
from flops_ray.config import AllocatorConfig, EstimatorConfig, TrainConfig, require
from flops_ray.estimators import ESTIMATORS, queries_per_draw, terms_need_activations


def reuses_pilot(estimator: EstimatorConfig, allocator: AllocatorConfig) -> bool:
    """Whether the pilot's queries enter the estimate.

    Not when a trace-reading allocation is computed from them: counts chosen from the pilot's draws would
    weight those same draws, which biases the estimate (docs/DESIGN.md section 3).
    """
    chosen_by_pilot = allocator.signal == "pilot" and ALLOCATORS[allocator.kind].allocates_from_traces
    return estimator.pilot_queries > 0 and not chosen_by_pilot


def reads_pilot(estimator: EstimatorConfig, allocator: AllocatorConfig) -> bool:
    """Whether a step reads its pilot's traces (to allocate, or to fit the allocator): only then does the pilot
    run as a round of its own, before the allocation."""
    return estimator.pilot_queries > 0 and allocator.signal == "pilot" and ALLOCATORS[allocator.kind].needs_traces


def least_queries(estimator: EstimatorConfig, allocator: AllocatorConfig) -> int:
    """Fewest queries any sample may be given: the floor, and a pilot plus one draw when the pilot is not reused."""
    pilot = estimator.pilot_queries
    if pilot and not reuses_pilot(estimator, allocator):
        return max(estimator.floor, pilot + queries_per_draw(estimator))
    return max(estimator.floor, pilot)


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Check ``cfg``'s values, then what the registries say of them; returns ``cfg`` so calls chain.

    Raises:
        ConfigError: naming the field that is wrong.
    """
    cfg.validate()
    ESTIMATORS[cfg.estimator.kind], ALLOCATORS[cfg.allocator.kind]
    require(
        cfg.farm.reduction != "scalar" or not terms_need_activations(cfg.estimator),
        "farm.reduction",
        f"scalar needs an SPSA or ES estimator ({cfg.estimator.kind}'s terms depend on activations, not only on seeds)",
    )
    if not cfg.backprop:
        _check_budgets(cfg)
    return cfg


def _check_budgets(cfg: TrainConfig) -> None:
    est, unit = cfg.estimator, queries_per_draw(cfg.estimator)
    if cfg.allocator.signal == "pilot" and ALLOCATORS[cfg.allocator.kind].needs_traces:
        require(
            est.pilot_queries >= 2 * unit,
            "estimator.pilot_queries",
            f"{cfg.allocator.kind} allocation from the pilot (allocator.signal=pilot) reads trace estimates, "
            f"which need >= 2 independent draws ({2 * unit} queries for {est.kind}), got {est.pilot_queries}",
        )
    minimum = least_queries(est, cfg.allocator)
    for g in cfg.groups:
        require(
            g.queries_per_sample >= minimum,
            f"groups[{g.name}].queries_per_sample",
            f"budget {g.queries_per_sample}x{cfg.batch_size} is below the floor {minimum}x{cfg.batch_size} "
            "(estimator.floor, or the pilot plus one more draw when the pilot is not reused)",
        )
