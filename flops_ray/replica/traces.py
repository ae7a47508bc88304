"""Per-item trace estimates from a shard's terms, read on a random subset of each group's coordinates.

A query's gradient term has ``P_g`` coordinates; the trace ``T_j`` of an item's query covariance is estimated
from ``K`` of them, drawn once per step and group (the same on every replica), and scaled by ``P_g / K``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flops_ray.estimators import RowPlan
from flops_ray.messages import ShardTask
from flops_ray.seeding import STREAM_TRACE, generator


class TraceSampler:
    """The coordinates each group is sub-sampled on for trace estimates, and the per-item traces they give.

    Args:
        sizes: per group, its parameter count ``P_g``.
        coords: coordinates read per group (``estimator.trace_coords``).
        unit: queries per draw (2 for antithetic pairs).
        root_seed: the run's root seed.
        device: where the terms live.
    """

    def __init__(self, sizes: Sequence[int], coords: int, unit: int, root_seed: int, device: torch.device):
        self.sizes = tuple(sizes)
        self.k = coords
        self.unit = unit
        self.root_seed = root_seed
        self.device = device
        self._coords: dict[tuple[int, int], torch.Tensor] = {}

    def coords(self, step: int, group: int) -> torch.Tensor:
        """``(K,)`` sorted coordinates of the group sub-sampled for trace estimates (same on every replica): all of
        a group no larger than ``K``, else ``K`` uniform draws (with replacement, so the ``P/K`` scaling stays
        unbiased and no permutation of ``P_g`` is made)."""
        key = (step, group)
        if key not in self._coords:
            size = self.sizes[group]
            if size <= self.k:
                coords = torch.arange(size)
            else:
                coords = torch.randint(size, (self.k,), generator=generator(self.root_seed, STREAM_TRACE, step, group))
            # Only the current step's coordinates are kept: a step reads no other.
            self._coords = {key: coords.sort().values.to(self.device)}
        return self._coords[key]

    def item_traces(self, task: ShardTask, rows: RowPlan, sub: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per item ``T_j ~ unit * (P/K) * sum_k Var_units[G_unit,k]`` from the task's sub-sampled terms
        ``sub (R, K)``, and its degrees of freedom (units - 1).

        A unit is one independent draw (a pair's mean for antithetic estimators); per-query variance is
        ``unit`` times the unit variance, which is what ``J(A) = sum T_j / A_j`` counts. An item with one
        draw in the task has no variance to measure: NaN with 0 degrees of freedom. One pass over the items
        with index sums (two-pass variance, float32) and one copy to the host.
        """
        unit, n_items = self.unit, len(task.items)
        g = sub.view(-1, unit, sub.shape[-1]).mean(1)  # (U, K): units never straddle items
        item = rows.item[::unit]
        n = torch.zeros(n_items, device=g.device).index_add_(0, item, torch.ones(len(item), device=g.device))
        mean = torch.zeros(n_items, g.shape[1], device=g.device).index_add_(0, item, g) / n.clamp(min=1)[:, None]
        sq = torch.zeros_like(mean).index_add_(0, item, (g - mean[item]) ** 2).sum(1)
        scale = unit * self.sizes[task.group] / sub.shape[1]
        traces = torch.where(n > 1, scale * sq / (n - 1).clamp(min=1), float("nan"))
        return traces.double().cpu().numpy(), (n - 1).clamp(min=0).double().cpu().numpy()
