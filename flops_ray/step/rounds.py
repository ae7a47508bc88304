"""A forward-only step's rounds of shard tasks with their results, and what the step reads from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from flops_ray.messages import ShardResult, ShardTask


@dataclass(frozen=True)
class CleanPass:
    """The clean pass over a batch: one unperturbed forward per sample."""

    results: list[ShardResult]
    losses: np.ndarray
    """``(B,)`` clean losses, the queries' baselines."""
    embeddings: torch.Tensor
    """``(B, D)`` sample embeddings, for the allocators."""
    proxies: np.ndarray
    """``(B, G)`` trace proxies per layer group (NaN where the model has none)."""

    @classmethod
    def of(cls, results: list[ShardResult]) -> CleanPass:
        """The pass whose tasks, in batch order, returned ``results``."""
        return cls(
            results,
            np.concatenate([r.losses for r in results]),
            torch.from_numpy(np.concatenate([r.embeddings for r in results])),
            np.concatenate([r.proxies for r in results]),
        )


@dataclass(frozen=True)
class Round:
    """Tasks and their results, in task order."""

    tasks: list[ShardTask] = field(default_factory=list)
    results: list[ShardResult] = field(default_factory=list)

    def __add__(self, other: Round) -> Round:
        return Round(self.tasks + other.tasks, self.results + other.results)

    def traces(self, group: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """``(B,)`` trace estimates of ``group`` pooled over tasks (weighted by degrees of freedom) and their dof.

        NaN where no task measured a sample's trace.
        """
        total, dof = np.zeros(b), np.zeros(b)
        for task, res in zip(self.tasks, self.results):
            if task.group == group and res.traces is not None:
                pos = np.array([it.pos for it in task.items])
                ok = res.trace_dof > 0
                np.add.at(total, pos[ok], res.trace_dof[ok] * res.traces[ok])
                np.add.at(dof, pos[ok], res.trace_dof[ok])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(dof > 0, total / dof, np.nan), dof
