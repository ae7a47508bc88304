"""The telemetry's predicted variance ratio against the one repeated estimates of the same batch realise.

A step reports, per group, ``variance_ratio = J(A) / J(equal)`` on the traces its allocator read (Theorem 1:
the estimate's variance is ``(1/B^2) sum_j T_j / A_j``). Here one batch is estimated ``reps`` times with fresh
noise by the run's allocator and by equal allocation at the same budget, the same noise for both (paired
repetitions); the realised ratio is their mean squared errors to the exact backprop gradient, group by group.
"""

from __future__ import annotations

import copy

import numpy as np

from flops_ray.allocation.allocators import create_allocator
from flops_ray.config import AllocatorConfig
from flops_ray.data.arrays import batch_at
from flops_ray.studies.allocation_study import REP_STEP, _forward_step, exact_gradient
from flops_ray.studies.local_replicas import local_backend
from flops_ray.training.trainer import Trainer


def predicted_vs_realised(trainer: Trainer, reps: int, warmup: int = 8) -> dict:
    """Per group, the mean predicted ``variance_ratio`` of the run's allocator over ``reps`` estimates of the
    batch of ``trainer``'s next step, the ratio of its mean squared error to equal allocation's, the mean of
    the telemetry's own ``realised_variance_ratio``, and the relative error of the prediction.

    Args:
        trainer: the run (its config's allocator, its model, its trace memory).
        reps: paired repetitions.
        warmup: steps on the batch that fit a gaussian allocator's lambda first, as a run's earlier steps would.
    """
    cfg, s = trainer.cfg, trainer.step_count
    ids = batch_at(len(trainer.train_set), cfg.batch_size, cfg.seed, s)
    batch = (trainer.train_set.x[ids], trainer.train_set.y[ids], ids)
    backend = local_backend(copy.deepcopy(trainer.model), cfg.groups, cfg.estimator, cfg.seed)
    memory = trainer.memory.state_dict()
    name = f"{cfg.allocator.kind}/{cfg.allocator.signal}"
    run = _forward_step(trainer, backend, memory, name, [create_allocator(cfg.allocator) for _ in cfg.groups])
    equal = _forward_step(
        trainer, backend, memory, name, [create_allocator(AllocatorConfig("equal")) for _ in cfg.groups]
    )
    for _ in range(warmup if cfg.allocator.kind == "gaussian" else 0):
        run(REP_STEP - 3, *batch)
    exact = np.split(
        exact_gradient(cfg, trainer.model, batch[0], batch[1]), np.cumsum([g.size for g in trainer.groups])[:-1]
    )
    errors = {"run": [], "equal": []}
    predicted, telemetry = [], []
    for r in range(reps):
        for key, forward in (("run", run), ("equal", equal)):
            forward.memory.load_state_dict(memory)
            reduced, report = forward(REP_STEP * (r + 1) + s, *batch)
            errors[key].append([float(((g - e) ** 2).sum()) for g, e in zip(reduced.grads, exact)])
            if key == "run":
                predicted.append(report.variance_ratio)
                telemetry.append(report.realised_variance_ratio)
    mse = {k: np.mean(v, axis=0) for k, v in errors.items()}
    rows = []
    for g, group in enumerate(cfg.groups):
        realised = float(mse["run"][g] / mse["equal"][g])
        guess = float(np.mean([p[g] for p in predicted]))
        rows.append(
            {
                "group": group.name,
                "predicted": guess,
                "realised": realised,
                "relative_error": abs(guess - realised) / realised,
                "telemetry_realised": float(np.nanmean([t[g] for t in telemetry])),
                # The realised ratio's own noise: the standard error of the paired log-ratio of squared errors.
                "realised_se": float(_ratio_se(np.array(errors["run"])[:, g], np.array(errors["equal"])[:, g])),
            }
        )
    return {"step": s, "reps": reps, "allocator": name, "groups": rows}


def _ratio_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of ``mean(a) / mean(b)`` over paired samples (the delta method)."""
    n = len(a)
    ma, mb = a.mean(), b.mean()
    cov = np.cov(np.stack([a, b]), ddof=1) / n
    return float(abs(ma / mb) * np.sqrt(cov[0, 0] / ma**2 + cov[1, 1] / mb**2 - 2 * cov[0, 1] / (ma * mb)))
