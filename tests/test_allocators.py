"""Allocation theory on synthetic traces: orderings of J, the Theorem-2 gap, integer budgets."""

from __future__ import annotations

import pytest
import torch

from flops_ray.allocation.allocators import AllocationFeatures, bernoulli_weights, create_allocator
from flops_ray.allocation.budget import allocation_objective, equal_neyman_gap, fill_to_total, to_counts
from flops_ray.allocation.gaussian import GaussianAllocator, factors, surrogate_gradient
from flops_ray.config import AllocatorConfig


def _synthetic(b: int = 32, seed: int = 0) -> AllocationFeatures:
    """Heterogeneous traces (log-normal, 10x-100x spread) that grow with the loss, as in training."""
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(b, generator=g, dtype=torch.float64) * 3
    traces = torch.exp(1.5 * losses + 0.5 * torch.randn(b, generator=g, dtype=torch.float64))
    emb = torch.randn(b, 8, generator=g, dtype=torch.float64)
    return AllocationFeatures(traces, losses, emb)


def test_theorem2_gap_formula():
    feats = _synthetic()
    total = 16.0 * 32
    eq = allocation_objective(feats.traces, torch.full((32,), 16.0, dtype=torch.float64))
    ney = allocation_objective(feats.traces, fill_to_total(feats.traces.sqrt(), total, 0.0))
    assert eq - ney == pytest.approx(equal_neyman_gap(feats.traces, total).item(), rel=1e-9)
    assert ney == pytest.approx((feats.traces.sqrt().sum() ** 2 / total).item(), rel=1e-9)


@pytest.mark.parametrize("lam", [(1.0, 0.5, -1.6, 0.0), (0.7, -0.3, -0.4, -0.8)])
def test_closed_form_fit_gradient_equals_autograd(lam):
    """The fit's closed-form LR gradient equals autograd through the Gaussian's log-density (eq. 11)."""
    feats = _synthetic(b=24, seed=3)
    d = GaussianAllocator.distances(feats.embeddings)
    phi, mean_alloc = torch.tanh(feats.losses), 16.0
    g = torch.Generator().manual_seed(4)
    lam = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, generator=g, dtype=torch.float64)
    # The reference: the same density written with autograd-visible operations.
    b0, b1, log_s, log_g = lam
    cov = (mean_alloc * torch.exp(log_s)) ** 2 * torch.exp(-d / torch.exp(2 * log_g))
    cov = cov + 1e-4 * mean_alloc**2 * torch.eye(24, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(mean_alloc * (b0 + b1 * phi), covariance_matrix=cov)
    with torch.no_grad():
        raw = ref.mean + torch.randn(6, 24, generator=g, dtype=torch.float64) @ ref.scale_tril.T
    (weights * ref.log_prob(raw)).sum().backward()
    closed = surrogate_gradient(factors(lam.detach(), phi, d, mean_alloc), phi, d, mean_alloc, raw, weights)
    torch.testing.assert_close(closed, lam.grad, rtol=1e-8, atol=1e-10)


def test_objective_ordering_neyman_fitted_initial():
    """J(neyman) <= J(gaussian fitted) <= J(gaussian initial), and J(neyman) <= J(equal)."""
    feats = _synthetic()
    total, minimum = 16 * 32, 2
    gauss = GaussianAllocator(draws=32, iters=150, lr=0.05)
    initial = gauss.lam.clone()
    gauss.fit(feats, total, minimum, torch.Generator().manual_seed(1))
    evaluate = lambda lam: gauss.expected_objective(lam, feats, total, minimum, torch.Generator().manual_seed(2))  # noqa: E731
    j_init, j_fit = evaluate(initial), evaluate(gauss.lam)
    j_ney = allocation_objective(feats.traces, fill_to_total(feats.traces.sqrt(), total, minimum)).item()
    j_eq = allocation_objective(feats.traces, torch.full((32,), 16.0, dtype=torch.float64)).item()
    assert j_ney <= j_fit <= j_init
    assert j_ney <= j_eq
    # Fitting must close a real part of the gap to the optimum, not just move by Monte Carlo noise.
    assert j_fit < j_init - 0.25 * (j_init - j_ney)


@pytest.mark.parametrize("kind", ["equal", "neyman", "bernoulli", "gaussian"])
def test_counts_are_even_floored_and_exact(kind):
    feats = _synthetic(b=24, seed=3)
    alloc = create_allocator(AllocatorConfig(kind=kind, gaussian_iters=5))
    counts = alloc.allocate(feats, total=24 * 12, minimum=4, unit=2, gen=torch.Generator().manual_seed(0))
    assert counts.sum().item() == 24 * 12
    assert (counts >= 4).all() and (counts % 2 == 0).all()


def test_neyman_counts_follow_sqrt_trace():
    traces = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    counts = to_counts(traces.sqrt(), total=40, minimum=2, unit=2)
    assert counts.tolist() == [4, 8, 12, 16]


def test_floor_water_filling():
    """Samples whose share is below the floor get exactly the floor; the rest stay proportional."""
    w = torch.tensor([0.01, 0.01, 1.0, 3.0], dtype=torch.float64)
    a = fill_to_total(w, total=20.0, minimum=2.0)
    assert a[:2].tolist() == [2.0, 2.0]
    assert a.sum().item() == pytest.approx(20.0)
    assert (a[3] / a[2]).item() == pytest.approx(3.0)


def test_budget_below_floor_is_an_error():
    with pytest.raises(ValueError, match="below floor"):
        to_counts(torch.ones(4), total=6, minimum=2, unit=2)


def _missing_traces():
    """A one-draw pilot (MeZO) measures no trace: NaN at two samples."""
    feats = _synthetic(b=8)
    feats.traces[[2, 5]] = float("nan")
    return feats


def test_neyman_allocation_rejects_missing_traces():
    """Neyman reads traces when it allocates: the error names the samples and the setting to change."""
    alloc = create_allocator(AllocatorConfig(kind="neyman"))
    with pytest.raises(ValueError, match=r"positions \[2, 5\].*pilot_queries"):
        alloc.allocate(_missing_traces(), total=32, minimum=2, unit=2, gen=torch.Generator())


def test_gaussian_fit_rejects_missing_traces_and_keeps_its_state():
    """The Gaussian allocator reads traces when it fits: the fit raises and lambda stays as it was."""
    alloc = create_allocator(AllocatorConfig(kind="gaussian", gaussian_iters=2))
    before = alloc.state_dict()["lambda"].clone()
    with pytest.raises(ValueError, match=r"positions \[2, 5\].*pilot_queries"):
        alloc.update(_missing_traces(), total=32, minimum=2, gen=torch.Generator())
    assert torch.equal(alloc.state_dict()["lambda"], before)


def test_bernoulli_prunes_only_easy_samples_and_keeps_total():
    losses = torch.tensor([0.1, 0.2, 3.0, 4.0], dtype=torch.float64)
    w = bernoulli_weights(losses, p=1.0, gen=torch.Generator().manual_seed(0))
    assert w.tolist() == [0.5, 0.5, 1.5, 1.5]
    w0 = bernoulli_weights(losses, p=0.0, gen=torch.Generator().manual_seed(0))
    assert w0.tolist() == [1.0] * 4


def test_gaussian_state_round_trips_and_rejects_garbage():
    a = GaussianAllocator()
    a.lam = torch.tensor([1.1, 0.3, -1.0, 0.2], dtype=torch.float64)
    b = GaussianAllocator()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.lam, b.lam)
    with pytest.raises(ValueError, match="lambda"):
        b.load_state_dict({"lambda": torch.tensor([float("nan")] * 4)})
