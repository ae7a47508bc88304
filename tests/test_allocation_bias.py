"""Every allocator keeps the gradient estimate unbiased: the mean estimate over thousands of seeds against the
exact gradient of a quadratic black box, at step 0 and after earlier steps have filled the trace memory.

Per sample ``L_j(theta) = 1/2 sum_d a_jd (theta_d - c_jd)^2`` with scales ``a_j`` spread over two decades,
so traces differ a lot and allocation matters. On a quadratic, SPSA's pair difference is exactly
``grad . eps``: the estimate is unbiased with no smoothing term, and any bias is the allocation's.

Tolerances from theory: over ``N`` seeds the per-coordinate ``z = (mean - g) / se`` is ``N(0, 1)`` under
no bias, so ``mean z^2`` over ``D = 6`` coordinates is ``chi2_6 / 6``; ``P(chi2_6 > 24) = 5e-4`` gives the
bound 4. The projection on the true gradient's direction is one more ``N(0, 1)``: ``|z| < 4.5``. A
Neyman allocation that reuses the pilot draws it was chosen from scores ``mean z^2`` near 8 and
``z`` near -6 here (its estimate is short along the gradient).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flops_ray import BlackBox
from flops_ray.allocation.allocators import ALLOCATORS, create_allocator
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import AllocatorConfig, EstimatorConfig
from flops_ray.replica.replica import Replica, ReplicaSpec
from flops_ray.step.forward import ForwardStep
from flops_ray.step.local_backend import LocalBackend

D, B, SEEDS = 6, 8, 1500
_gen = torch.Generator().manual_seed(0)
SCALE = torch.logspace(-1, 1, B)[:, None] * (0.5 + torch.rand(B, D, generator=_gen))  # a_j (B, D)
CENTRE = torch.randn(B, D, generator=_gen)  # c_j (B, D)
X = torch.cat([SCALE, CENTRE], 1).numpy()  # each data row carries its own a_j and c_j
Y = np.zeros(B, dtype=np.int64)
THETA = np.zeros(D, dtype=np.float32)
EXACT = (SCALE * (torch.from_numpy(THETA) - CENTRE)).mean(0).double().numpy()


def quadratic(thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(R, D), (R, 2D), (R,) -> (R,)`` per-sample quadratic losses."""
    a, c = x[:, :D], x[:, D:]
    return 0.5 * (a * (thetas - c) ** 2).sum(-1)


BOX = BlackBox(quadratic, torch.from_numpy(THETA))
GROUPS = (BlackBox.group(sigma=0.1, queries_per_sample=8),)


def _estimates(allocator: AllocatorConfig, pilot: int, step: int) -> np.ndarray:
    """``(SEEDS, D)`` the step-``step`` estimate of runs that differ only in their root seed."""
    est = EstimatorConfig(kind="spsa", pilot_queries=pilot)
    out = []
    for seed in range(SEEDS):
        forward = ForwardStep(
            LocalBackend(Replica(BOX, ReplicaSpec(GROUPS, est, root_seed=seed))),
            groups=GROUPS,
            sizes=[D],
            widths=[None],
            estimator=est,
            allocator=allocator,
            allocators=[create_allocator(allocator)],
            memory=TraceMemory(1, B, allocator.memory_decay, allocator.memory_prior),
            shard_cost=1024,
            root_seed=seed,
        )
        for t in range(step + 1):
            reduced, _ = forward(t, X, Y, np.arange(B))
        (grad,) = reduced.grads
        out.append(grad)
    return np.array(out)


CASES = [
    # (kind, signal, pilot queries, step): every registered allocator, every signal it can read.
    ("equal", "clean", 0, 0),
    ("equal", "clean", 4, 0),
    ("bernoulli", "clean", 0, 0),
    pytest.param("gaussian", "pilot", 4, 0, marks=pytest.mark.slow),  # the fit costs 10-30 s here
    pytest.param("gaussian", "memory", 0, 3, marks=pytest.mark.slow),
    ("neyman", "pilot", 4, 0),
    ("neyman", "memory", 0, 3),
    ("neyman", "clean", 0, 3),
]


def test_every_registered_allocator_is_checked():
    kinds = {case.values[0] if hasattr(case, "values") else case[0] for case in CASES}
    assert kinds == set(ALLOCATORS)


@pytest.mark.parametrize(("kind", "signal", "pilot", "step"), CASES)
def test_mean_estimate_matches_the_exact_gradient(kind, signal, pilot, step):
    allocator = AllocatorConfig(kind=kind, signal=signal, gaussian_iters=3, gaussian_draws=8)
    grads = _estimates(allocator, pilot, step)
    se = grads.std(0, ddof=1) / np.sqrt(SEEDS)
    z = (grads.mean(0) - EXACT) / se
    assert (z**2).mean() < 4.0, f"mean z^2 = {(z**2).mean():.2f}, z = {np.round(z, 2)}"
    u = EXACT / np.linalg.norm(EXACT)
    along = grads @ u
    z_along = (along.mean() - EXACT @ u) / (along.std(ddof=1) / np.sqrt(SEEDS))
    assert abs(z_along) < 4.5, f"along the gradient: z = {z_along:.2f}"
