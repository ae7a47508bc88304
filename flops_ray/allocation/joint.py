"""Joint allocation: one step budget split over (group, sample) cells, Neyman over all of them.

A query perturbs one group, so the update's error is the sum over groups of each group's
``(1/B^2) sum_j T_gj / A_gj`` (Theorem 1's ``J(A)``, eq. 9, per group): the variance of the concatenated
update, every group stepping with the same learning rate. Minimising ``sum_g sum_j T_gj / A_gj`` under one
budget ``sum_g A0_g`` gives ``A_gj ~ sqrt(T_gj)`` over all cells (the proof of Theorem 2 with cells for
samples), water-filled above the floor. Unlike the per-sample split, the traces must now be comparable
across groups. Under LR a query term's trace is about the group's noise width (the linears' output width)
times its clean-pass proxy, so when every group reads its proxy, proxies times widths are one scale (up to
one factor common to all groups, which Neyman ignores), from the first step on. Otherwise (SPSA/ES, whose
proxy only bounds the trace, or a signal from the trace memory) each group's signal is scaled to its
group's level, the mean trace its earlier visits measured. Widths, proxies and levels all come from outside the
step's draws, so the counts never depend on the draws they weight and the estimate stays unbiased
(docs/DESIGN.md section 3).

>>> counts = joint_counts([torch.tensor([1.0, 1.0]), torch.tensor([16.0, 64.0])], [8, 8], minimum=2, unit=2)
>>> [c.tolist() for c in counts]
[[2, 2], [4, 8]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flops_ray.allocation.budget import to_counts


def joint_counts(traces: Sequence[torch.Tensor], budgets: Sequence[int], minimum: int, unit: int) -> list[torch.Tensor]:
    """Per group, integer counts ``(B,)`` with ``A_gj ~ sqrt(T_gj)`` over all cells, summing to ``sum(budgets)``.

    Args:
        traces: per group, ``(B,)`` traces on one scale across groups.
        budgets: per group, its configured step budget ``A0_g``; only their sum is spent.
        minimum: the floor of every cell; unit: counts are multiples of it.
    """
    sizes = [len(t) for t in traces]
    cells = torch.cat([t.to(torch.float64).clamp_min(0).sqrt() for t in traces])
    return list(to_counts(cells, int(sum(budgets)), minimum, unit).split(sizes))


def leveled(signal: torch.Tensor, level: float | None) -> torch.Tensor | None:
    """``signal`` ``(B,)`` rescaled so its mean is ``level``; None where that is undefined (no level yet, a
    non-finite or all-zero signal), and the step then keeps the groups' own budgets."""
    mean = float(signal.mean()) if torch.isfinite(signal).all() else float("nan")
    if level is None or not (mean > 0) or not (level >= 0):
        return None
    return signal.to(torch.float64) * (level / mean)


def scaled_joint_counts(
    signals: Sequence[torch.Tensor],
    widths: Sequence[float] | None,
    levels: Sequence[float | None],
    budgets: Sequence[int],
    minimum: int,
    unit: int,
) -> list[torch.Tensor] | None:
    """:func:`joint_counts` on every group's signal ``(B,)`` put on one scale: clean-pass proxies times their
    groups' noise ``widths`` (given when every group reads its proxy under LR), else each signal scaled to its
    group's level (:func:`leveled`). None while a group has no level, and each group then keeps its own budget."""
    if widths is not None:
        traces = [s.to(torch.float64) * w for s, w in zip(signals, widths)]
    else:
        traces = [leveled(s, level) for s, level in zip(signals, levels)]
    if any(t is None for t in traces):
        return None
    return joint_counts(traces, budgets, minimum, unit)
