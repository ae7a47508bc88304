"""The Gaussian allocator (paper eq. 5, section 4.3), fitted by the likelihood-ratio gradient (eqs. 9-11).

``A ~ N(mu, S)`` with ``mu_j = A (b0 + b1 tanh L_j)`` and ``S_ij = (A s)^2 exp(-d_ij / g^2)``,
``d_ij = 1 - cos(e_i, e_j)``, ``A = A0 / B``. For unit embeddings ``d_ij = |e_i - e_j|^2 / 2``, so this is
the Gaussian RBF kernel and ``S`` is positive definite; the tempting form ``exp(-d_ij^2 / (2 g^2))`` in ``d``
is not (a kernel in the 4th power of a distance), and its Cholesky factor fails on real embeddings. ``lambda = (b0, b1, s, g)`` is kept relative to ``A``
and starts at ``(1, 1/2, 1/5, 1)``, the paper's ``(A, A/2, A/5, 1)``. A draw is clipped at 0 and
rescaled so the allocation sums to ``A0`` with every entry at least the floor.

The fit is amortised: ``allocate`` samples from the current ``lambda`` and ``update`` takes the warm-started
LR steps on the same batch's features, for the next step. The step runs ``update`` on a copy in a thread,
from its main round until the next step's allocation, so the fit costs step time only where it outlasts a
whole step. The paper's fit-then-sample order differs by one step of lag. The fit's gradient is in closed
form (:func:`surrogate_gradient`) rather than autograd through the Cholesky factor (timings: docs/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flops_ray.allocation.budget import allocation_objective, to_counts
from flops_ray.config import AllocatorConfig

_JITTER = 1e-4  # relative to A^2: keeps the Cholesky factor defined when g -> 0
_LAST_DISTANCES: list[tuple[torch.Tensor, torch.Tensor]] = []
"""The last batch's ``(embeddings, distances)``: every group's allocator and fit read the same embeddings."""


@dataclass(frozen=True)
class Factors:
    """``N(mu, S)`` of one batch under one ``lambda``, with the pieces its gradient reuses."""

    mu: torch.Tensor
    """``(B,)`` mean."""
    kernel: torch.Tensor
    """``(B, B)`` ``K = exp(-d / g^2)``."""
    scale: float
    """``C = (A s)^2``: ``S = C K + jitter``."""
    inv_g2: float
    """``1 / g^2``."""
    chol: torch.Tensor
    """``(B, B)`` lower Cholesky factor of ``S``."""


def factors(lam: torch.Tensor, phi: torch.Tensor, d: torch.Tensor, mean_alloc: float) -> Factors:
    """:class:`Factors` of ``lambda = (b0, b1, log s, log g)`` for a batch with ``phi = tanh(losses) (B,)`` and
    cosine distances ``d (B, B)``, ``A = mean_alloc`` (eq. 5)."""
    b0, b1, log_s, log_g = lam.tolist()
    inv_g2 = math.exp(-2 * log_g)
    kernel = torch.exp(-d * inv_g2)
    scale = (mean_alloc * math.exp(log_s)) ** 2
    cov = scale * kernel + _JITTER * mean_alloc**2 * torch.eye(len(phi), dtype=torch.float64)
    # The covariance is PD by construction (see the module docstring).
    return Factors(mean_alloc * (b0 + b1 * phi), kernel, scale, inv_g2, torch.linalg.cholesky(cov))


def surrogate_gradient(
    f: Factors, phi: torch.Tensor, d: torch.Tensor, mean_alloc: float, raw: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``(4,)`` gradient in ``lambda`` of ``sum_k weights_k log p(raw_k | lambda)`` (the LR gradient of eq. 11
    with the weights fixed), in closed form: a few ``B x B`` products instead of autograd through a Cholesky
    factor.

    With ``r_k = raw_k - mu`` and ``G = (S^-1 R W R^T S^-1 - sum(w) S^-1) / 2`` (``R: (B, K)``, ``W = diag(w)``),
    ``d/dmu = S^-1 R w`` and ``d/dtheta = sum_ij G_ij dS_ij/dtheta``, where ``dS/dlog s = 2 C K`` and
    ``dS/dlog g = 2 C K o d / g^2``.

    Args:
        f: :func:`factors` of ``lambda``.
        phi: ``(B,)`` ``tanh`` of the losses.
        d: ``(B, B)`` cosine distances.
        mean_alloc: ``A``.
        raw: ``(K, B)`` draws.
        weights: ``(K,)``.
    """
    u = torch.cholesky_solve((raw - f.mu).T, f.chol)  # (B, K): S^-1 R
    g_mu = u @ weights
    big = (u * weights) @ u.T - weights.sum() * torch.cholesky_inverse(f.chol)  # 2 G
    g_s = (big * f.kernel).sum() * f.scale
    g_g = (big * f.kernel * d).sum() * f.scale * f.inv_g2
    return torch.stack([mean_alloc * g_mu.sum(), mean_alloc * (g_mu * phi).sum(), g_s, g_g])


def process_draws(raw: torch.Tensor, total: float, minimum: float) -> torch.Tensor:
    """Map raw Gaussian draws ``(K, B)`` to allocations: clip at 0, then ``minimum`` plus a share of the rest.

    Every row sums to ``total`` and no entry is below ``minimum``.
    """
    clipped = raw.clamp_min(0)
    share = clipped / clipped.sum(-1, keepdim=True).clamp_min(1e-12)
    free = total - minimum * raw.shape[-1]
    return minimum + free * share


class GaussianAllocator:
    """Gaussian allocator with ``lambda`` fitted each step and warm-started from the previous one."""

    needs_traces = True
    allocates_from_traces = False
    """``allocate`` samples from ``lambda`` fitted on earlier steps; only ``update`` reads the traces."""

    @classmethod
    def from_config(cls, cfg: AllocatorConfig) -> GaussianAllocator:
        return cls(cfg.gaussian_draws, cfg.gaussian_iters, cfg.gaussian_lr)

    def __init__(self, draws: int = 32, iters: int = 25, lr: float = 0.05):
        self.draws = draws
        self.iters = iters
        self.lr = lr
        self.lam = self.initial_lambda()

    @staticmethod
    def initial_lambda() -> torch.Tensor:
        """``(b0, b1, log s, log g)`` relative to the mean allocation: the paper's ``(A, A/2, A/5, 1)``."""
        return torch.tensor([1.0, 0.5, math.log(0.2), 0.0], dtype=torch.float64)

    @staticmethod
    def distances(embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, B)`` cosine distances ``d_ij = 1 - cos(e_i, e_j)``, fixed for a batch.

        A step hands every group's allocator (and their fits) the same embeddings tensor, never changed in
        place, so the last one's matrix is reused.
        """
        last = _LAST_DISTANCES[0] if _LAST_DISTANCES else None
        if last is not None and last[0] is embeddings:
            return last[1]
        e = torch.nn.functional.normalize(embeddings.to(torch.float64), dim=-1)
        d = 1.0 - e @ e.T
        _LAST_DISTANCES[:] = [(embeddings, d)]
        return d

    def _factors(self, lam: torch.Tensor, feats, total: float) -> Factors:
        """:func:`factors` of ``lam`` for the batch of ``feats`` at the budget ``total``."""
        phi = torch.tanh(feats.losses.to(torch.float64))
        return factors(lam, phi, self.distances(feats.embeddings), total / feats.losses.numel())

    def expected_objective(
        self, lam: torch.Tensor, feats, total: float, minimum: float, gen: torch.Generator, draws: int = 4096
    ) -> float:
        """Monte Carlo ``E[J(A)]`` under ``lam`` (for tests and reports)."""
        f = self._factors(lam, feats, total)
        alloc = process_draws(self._draw(f.mu, f.chol, draws, gen), total, minimum)
        return allocation_objective(feats.traces.to(torch.float64), alloc).mean().item()

    @staticmethod
    def _draw(mu: torch.Tensor, chol: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        """``(n, B)`` draws of ``N(mu, chol chol^T)``."""
        z = torch.randn((n, mu.numel()), generator=gen, dtype=torch.float64)
        return mu + z @ chol.T

    def update(self, feats, total: float, minimum: float, gen: torch.Generator) -> None:
        """Fit ``lambda`` on this step's features; the next :meth:`allocate` samples from it."""
        self.fit(feats, total, minimum, gen)

    def fit(self, feats, total: float, minimum: float, gen: torch.Generator) -> torch.Tensor:
        """Minimise ``J(lambda) = E[sum_j T_j / A_j]`` by the LR gradient (eq. 11), warm-started.

        The gradient is ``mean_k (J(A_k) - b_k) grad log p(A_k | lambda)`` with the leave-one-out
        baseline ``b_k``, which keeps it unbiased while cancelling most of its variance.
        """
        traces = feats.finite_traces().to(torch.float64)
        mean_alloc = total / traces.numel()
        d = self.distances(feats.embeddings)
        phi = torch.tanh(feats.losses.to(torch.float64))
        lam = self.lam.clone()
        opt = torch.optim.Adam([lam], lr=self.lr)
        k = self.draws
        for _ in range(self.iters):
            f = factors(lam, phi, d, mean_alloc)
            raw = self._draw(f.mu, f.chol, k, gen)
            j = allocation_objective(traces, process_draws(raw, total, minimum))
            baseline = (j.sum() - j) / (k - 1)
            # Scale-free advantage: lambda's step does not depend on the units of T.
            adv = (j - baseline) / j.mean().clamp_min(1e-30)
            lam.grad = surrogate_gradient(f, phi, d, mean_alloc, raw, adv / k)
            opt.step()
        # A diverged fit (NaN) keeps the last good lambda rather than poisoning every later step.
        if torch.isfinite(lam).all():
            self.lam = lam.detach()
        return self.lam

    def allocate(self, feats, total, minimum, unit, gen):
        """Sample one allocation from the current ``lambda`` (call :meth:`update` to fit it)."""
        f = self._factors(self.lam, feats, total)
        alloc = process_draws(self._draw(f.mu, f.chol, 1, gen), total, minimum)[0]
        return to_counts(alloc, total, minimum, unit)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"lambda": self.lam.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        lam = state.get("lambda")
        if lam is None or lam.shape != (4,) or not torch.isfinite(lam).all():
            raise ValueError(f"gaussian allocator state needs a finite 'lambda' of shape (4,), got {lam!r}")
        self.lam = lam.to(torch.float64).clone()
