"""LR on a black box's linear parameterisation ``theta = theta0 + u W``: perturbing ``theta`` (the linear's output)
and mapping the estimate back through ``W`` is unbiased for ``u``'s gradient; not mapping it back is caught.

The box is a quadratic, ``L(theta) = 1/2 sum_k a_k (theta_k - c_k)^2`` per sample, whose exact gradient in ``u`` is
``W a (theta - c)``. On a quadratic the LR term ``(L(theta + sigma eps) - L(theta)) / sigma * W eps`` has mean
exactly ``W grad_theta`` (the ``sigma/2 eps^T A eps`` part multiplies an odd moment of ``eps``): no smoothing bias.

Tolerance from theory: over ``K`` independent blocks (disjoint query ranges, so disjoint seeds) the per-coordinate
``z = (mean - g) / se`` is a t-statistic with ``K - 1`` degrees of freedom, variance ``(K - 1) / (K - 3)``; for
correlated coordinates ``Var(sum z^2) = 2 sum_ij R_ij^2`` (``R`` their correlation, measured from the blocks), and
4 sd of ``mean z^2`` is allowed, as in tests/test_estimators.py.
"""

from __future__ import annotations

import pytest
import torch

from flops_ray import BlackBox
from flops_ray.config import EstimatorConfig
from flops_ray.estimators import box as box_module
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.replica.engine import QueryEngine

D_THETA, BLOCKS, PER_BLOCK = 8, 40, 100  # 4000 queries: 4000 seeds of the noise, 2000 antithetic pairs
_gen = torch.Generator().manual_seed(0)
SCALE = torch.logspace(-0.5, 0.5, D_THETA, dtype=torch.float64)  # a (D,)
CENTRE = torch.randn(D_THETA, generator=_gen, dtype=torch.float64)  # c (D,)
THETA0 = torch.randn(D_THETA, generator=_gen)


def quadratic(thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(R, D) -> (R,)`` the same quadratic for every data row (``x`` shifts nothing: one sample is enough)."""
    return 0.5 * (SCALE * (thetas - CENTRE) ** 2).sum(-1) + 0 * x.sum(-1)


def _engine(subspace: int, antithetic: bool) -> tuple[QueryEngine, torch.Tensor, float]:
    """The engine on the box (float64), the exact gradient in ``u`` at ``u = u0`` and the clean loss."""
    box = BlackBox(quadratic, THETA0, subspace=subspace, seed=5).double()
    with torch.no_grad():
        box.search.value.copy_(0.3 * torch.randn(box.search.value.shape, generator=_gen, dtype=torch.float64))
    est = EstimatorConfig(kind="lr", antithetic=antithetic)
    engine = QueryEngine(box, (BlackBox.group(sigma=0.05, queries_per_sample=2),), est, root_seed=11)
    engine.set_batch(0, torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.int64))
    u = box.search.value.detach().clone().requires_grad_(True)
    loss = quadratic(box.thetas(u[None]), torch.zeros(1, 1), torch.zeros(1)).sum()
    (exact,) = torch.autograd.grad(loss, u)
    return engine, exact, loss.item()


def _block_means(engine: QueryEngine, clean: float) -> torch.Tensor:
    """``(BLOCKS, d)`` independent mean estimates over disjoint query ranges."""
    out = []
    for k in range(BLOCKS):
        item = ShardItem(0, 3, k * PER_BLOCK, (k + 1) * PER_BLOCK, clean)
        task = ShardTask(kind=TaskKind.MAIN, step=0, group=0, index=k, items=(item,), weights=(1.0 / PER_BLOCK,))
        out.append(torch.from_numpy(engine.run(task).grad).double())
    return torch.stack(out)


def _mean_z2(means: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """``mean z^2`` of the blocks' mean against ``exact``, and the 4-sd bound around its expectation."""
    est, se = means.mean(0), means.std(0, unbiased=True) / BLOCKS**0.5
    z2 = (((est - exact) / se) ** 2).mean().item()
    expected = (BLOCKS - 1) / (BLOCKS - 3)
    sd = (2 * (torch.corrcoef(means.T) ** 2).sum()).sqrt().item() / len(exact) * expected
    return z2, 4 * sd


@pytest.mark.parametrize(("subspace", "antithetic"), [(3, True), (3, False), (D_THETA, True), (0, True)])
def test_lr_through_the_projection_is_unbiased(subspace, antithetic):
    engine, exact, clean = _engine(subspace, antithetic)
    means = _block_means(engine, clean)
    assert means.shape == (BLOCKS, subspace or D_THETA)
    z2, bound = _mean_z2(means, exact)
    expected = (BLOCKS - 1) / (BLOCKS - 3)
    assert abs(z2 - expected) < bound, f"mean z^2 = {z2:.3f}, expected {expected:.3f} +- {bound:.3f}"


def test_the_check_fails_when_the_estimate_is_not_mapped_back(monkeypatch):
    """The estimate of ``grad_theta`` taken for ``u``'s (a square ``W``, so the shapes agree): the same check
    rejects it by orders of magnitude."""
    monkeypatch.setattr(box_module.ProjectedEvaluation, "sums", lambda self, w: self.noise.weigh(w))
    engine, exact, clean = _engine(D_THETA, True)
    z2, bound = _mean_z2(_block_means(engine, clean), exact)
    assert abs(z2 - (BLOCKS - 1) / (BLOCKS - 3)) > 10 * bound, f"mean z^2 = {z2:.3f} within 10x {bound:.3f}"
