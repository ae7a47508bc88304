"""Per-sample trace memory: what earlier visits of a sample measured about its gradient noise.

Every query of a visit (pilot and main) yields an unbiased estimate of the sample's trace
``T_j = Tr Cov[G_j]`` with some degrees of freedom; the memory keeps, per group and dataset index, an
exponentially decayed average of them (traces drift as the model trains) and answers with Bayesian
shrinkage toward the batch's mean, so a sample seen once is trusted little and one never seen gets the
mean. Estimates come only from earlier steps, never from the draws they will weight, so allocating
from them keeps the gradient estimate unbiased (docs/DESIGN.md section 3).

>>> mem = TraceMemory(groups=1, size=4, decay=0.5, prior=2.0)
>>> mem.observe(0, torch.tensor([0, 1]), torch.tensor([1.0, 9.0]), torch.tensor([6.0, 6.0]))
>>> [round(v, 2) for v in mem.estimate(0, torch.tensor([0, 1, 2])).tolist()]
[2.0, 8.0, 5.0]
"""

from __future__ import annotations

import torch


class TraceMemory:
    """Decayed per-sample trace averages for ``groups`` layer groups over a dataset of ``size`` samples.

    Args:
        groups: layer groups.
        size: samples in the dataset (indices ``0 .. size-1``).
        decay: weight kept by old evidence at each new visit of a sample (0: only the last visit counts).
        prior: shrinkage weight, in degrees of freedom, of the batch mean in :meth:`estimate`.
    """

    def __init__(self, groups: int, size: int, decay: float = 0.5, prior: float = 4.0):
        self.decay = decay
        self.prior = prior
        self.total = torch.zeros(groups, size, dtype=torch.float64)
        """Decayed sum of ``dof * trace`` per group and sample."""
        self.weight = torch.zeros(groups, size, dtype=torch.float64)
        """Decayed sum of degrees of freedom per group and sample."""

    def observe(self, group: int, sample_ids: torch.Tensor, traces: torch.Tensor, dof: torch.Tensor) -> None:
        """Fold one visit's estimates in: ``traces (n,)`` with ``dof (n,)`` degrees of freedom each.

        Entries with no degrees of freedom (or a non-finite trace) leave the sample's memory as it was.
        """
        ok = (dof > 0) & torch.isfinite(traces)
        ids, t, w = sample_ids[ok], traces[ok].to(torch.float64), dof[ok].to(torch.float64)
        self.total[group, ids] = self.decay * self.total[group, ids] + w * t
        self.weight[group, ids] = self.decay * self.weight[group, ids] + w

    def estimate(self, group: int, sample_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` shrunk estimates ``(W_j m_j + prior * mu) / (W_j + prior)``, ``mu`` the batch's mean memory.

        A batch of samples never seen gets all-equal estimates (equal allocation).
        """
        total, weight = self.total[group, sample_ids], self.weight[group, sample_ids]
        seen = weight > 0
        mu = total[seen].sum() / weight[seen].sum() if seen.any() else torch.tensor(1.0, dtype=torch.float64)
        return (total + self.prior * mu) / (weight + self.prior)

    def group_mean(self, group: int) -> float | None:
        """The decayed mean trace of ``group`` over every sample seen so far (the group's level, for a joint
        allocation across groups); None before any visit fed it."""
        weight = float(self.weight[group].sum())
        return float(self.total[group].sum()) / weight if weight > 0 else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total.clone(), "weight": self.weight.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("total", "weight"):
            value = state.get(key)
            if value is None or value.shape != self.total.shape or not torch.isfinite(value).all():
                raise ValueError(
                    f"trace memory state needs a finite {key!r} of shape {tuple(self.total.shape)}, got "
                    f"{None if value is None else tuple(value.shape)}"
                )
        self.total = state["total"].to(torch.float64).clone()
        self.weight = state["weight"].to(torch.float64).clone()
