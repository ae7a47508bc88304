"""Query budgets: the allocation objective and integer counts that sum exactly to the budget.

>>> to_counts(torch.tensor([1.0, 1.0, 2.0]), total=16, minimum=2, unit=2).tolist()
[4, 4, 8]
"""

from __future__ import annotations

import torch


def allocation_objective(traces: torch.Tensor, alloc: torch.Tensor) -> torch.Tensor:
    """``J(A) = sum_j T_j / A_j`` (paper eq. 9), the variance of the summed per-sample means.

    Args:
        traces: ``(B,)`` per-sample ``T_j = Tr Cov[G(x_j)]``.
        alloc: ``(..., B)`` allocations, real or integer, all > 0.
    """
    return (traces / alloc).sum(-1)


def equal_neyman_gap(traces: torch.Tensor, total: float) -> torch.Tensor:
    """``J_eq - J* = (1/A0) sum_{j<k} (sqrt T_j - sqrt T_k)^2`` (Theorem 2, appendix A.3)."""
    r = traces.sqrt()
    diff = r[:, None] - r[None, :]
    return (diff**2).triu(1).sum() / total


def fill_to_total(weights: torch.Tensor, total: float, minimum: float) -> torch.Tensor:
    """Real allocation ``a_j = max(minimum, c * w_j)`` with ``sum a = total`` (water-filling).

    With ``w = sqrt(T)`` this is the Neyman optimum under a floor; with ``w`` all equal, the equal split.

    Args:
        weights: ``(B,)`` non-negative, not all zero (all-zero falls back to equal).
        total: the budget ``A0``; must be ``>= B * minimum``.
        minimum: the floor of every entry.
    """
    b = weights.numel()
    if total < b * minimum - 1e-9:
        raise ValueError(f"budget {total} is below floor {minimum} x batch {b}")
    w = weights.to(torch.float64).clamp_min(0)
    if not torch.isfinite(w).all():
        raise ValueError("allocation weights contain NaN or inf")
    if w.sum() <= 0:
        w = torch.ones_like(w)
    # Entries pinned at the floor are found by raising the set until the rest can share the remainder.
    order = torch.argsort(w)
    pinned = torch.zeros(b, dtype=torch.bool)
    for idx in order.tolist():
        free = ~pinned
        c = (total - minimum * pinned.sum()) / w[free].sum()
        if c * w[idx] >= minimum:
            break
        pinned[idx] = True
    free = ~pinned
    out = torch.full((b,), float(minimum), dtype=torch.float64)
    if free.any():
        out[free] = w[free] * (total - minimum * pinned.sum()) / w[free].sum()
    return out


def to_counts(weights: torch.Tensor, total: int, minimum: int, unit: int = 2) -> torch.Tensor:
    """Integer query counts proportional to ``weights``: multiples of ``unit``, each ``>= minimum``,
    summing exactly to ``total`` (largest-remainder rounding; ties go to the lower index).

    Args:
        weights: ``(B,)`` non-negative allocation weights (need not sum to anything).
        total: the budget ``A0``, a multiple of ``unit``.
        minimum: the floor, a multiple of ``unit``.
        unit: counts are multiples of this (2 for antithetic pairs).

    Returns:
        ``(B,)`` int64 counts.
    """
    if total % unit or minimum % unit:
        raise ValueError(f"total {total} and minimum {minimum} must be multiples of unit {unit}")
    real = fill_to_total(weights, total / unit, minimum / unit)
    base = real.floor().clamp_min(minimum // unit)
    short = round(total / unit - base.sum().item())
    frac = real - base
    # Stable sort on -frac: ties resolve by index, so the result is deterministic.
    extra = torch.argsort(-frac, stable=True)[: max(short, 0)]
    base[extra] += 1
    return (base * unit).to(torch.int64)
