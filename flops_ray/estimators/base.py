"""The estimator protocol, the typed row plan of a shard, and its noise.

Per query ``q`` of sample ``j`` in group ``g`` the replica computes a term ``c_q D_q`` with
``c_q = (L_q - b_j) / sigma`` (paper eqs. 1-3, docs/DESIGN.md section 1); a family says how a
shard's perturbed losses are computed and what ``D_q`` is. Every term is additive, so a sample's
estimate over ``[q0, q1)`` can be computed in pieces and summed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from flops_ray.config import EstimatorConfig
from flops_ray.groups import ResolvedGroup
from flops_ray.losses import LossFn
from flops_ray.messages import ShardTask
from flops_ray.seeding import query_noise
from flops_ray.trace_proxy import clean_pass


@dataclass(frozen=True)
class RowPlan:
    """A shard expanded into perturbed rows, one per query (each field ``(R,)`` on the replica's device)."""

    pos: torch.Tensor
    """Row of the query's sample in the step's batch."""
    item: torch.Tensor
    """Index of the query's item in the task."""
    draw: torch.Tensor
    """Index of the query's noise draw in ``draws``."""
    sign: torch.Tensor
    """``+1``, or ``-1`` for the second query of an antithetic pair."""
    draws: tuple[tuple[int, int], ...]
    """The distinct ``(sample_id, draw index)`` noise draws of the shard, in first-use order."""

    @classmethod
    def of(cls, task: ShardTask, unit: int, device: torch.device, dtype: torch.dtype) -> RowPlan:
        """Expand ``task``'s items: query ``q`` uses draw ``q // unit``, negated when odd within a pair."""
        pos, item, draw_key, sign = [], [], [], []
        for i, it in enumerate(task.items):
            for q in range(it.q0, it.q1):
                pos.append(it.pos)
                item.append(i)
                draw_key.append((it.sample_id, q // unit))
                sign.append(-1.0 if (unit == 2 and q % 2) else 1.0)
        draws = tuple(dict.fromkeys(draw_key))
        draw_of = {d: k for k, d in enumerate(draws)}
        return cls(
            pos=torch.tensor(pos, device=device),
            item=torch.tensor(item, device=device),
            draw=torch.tensor([draw_of[d] for d in draw_key], device=device),
            sign=torch.tensor(sign, device=device, dtype=dtype),
            draws=draws,
        )

    def __len__(self) -> int:
        return len(self.pos)

    def chunks(self, max_rows: int) -> list[slice]:
        """Row slices of at most ``max_rows`` (one batched forward each)."""
        return [slice(s, min(len(self), s + max_rows)) for s in range(0, len(self), max_rows)]


def signed_noise(root_seed: int, task: ShardTask, rows: RowPlan, size: int, dtype, device) -> torch.Tensor:
    """``(R, size)`` signed noise: one CPU draw per pair/query, one host-to-device copy per shard."""
    draws = torch.stack([query_noise(root_seed, task.step, sid, d, task.group, size, dtype) for sid, d in rows.draws])
    if device.type == "cuda":
        draws = draws.pin_memory().to(device, non_blocking=True)
    return draws[rows.draw] * rows.sign[:, None]


@dataclass(frozen=True)
class Shard:
    """What a family needs to evaluate one shard on a replica."""

    task: ShardTask
    rows: RowPlan
    x: torch.Tensor
    """``(B, ...)`` the step's batch on the replica's device."""
    y: torch.Tensor
    """``(B,)`` targets."""
    eps: torch.Tensor
    """``(R, noise_size)`` signed noise of the rows."""
    skip_errors: bool = False
    """``estimator.on_nonfinite = "skip"``: a failing black-box call drops its rows instead of raising."""


class Evaluation(Protocol):
    """A shard's perturbed losses and the linear maps from per-row weights to gradient sums."""

    losses: torch.Tensor
    """``(R,)`` perturbed losses."""

    def sums(self, w: torch.Tensor) -> torch.Tensor:
        """``(S, P_g)`` float64 sums ``sum_r w_rs D_r`` for row weights ``w (R, S)``."""

    def subsample(self, coef: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(R, K)`` per-row terms ``coef_r D_r[idx]`` at flat coordinates ``idx (K,)``."""


class Estimator(ABC):
    """One estimator family bound to one layer group of one model.

    Args:
        model: the replica's model (on its device, in eval mode).
        group: the layer group the family perturbs.
        cfg: estimator settings.
        loss_fn: per-sample loss.
    """

    linear_outputs = False
    """Whether the family perturbs the outputs of the group's ``nn.Linear`` modules (and trains only
    their weights and biases) rather than every parameter of the group's modules."""

    def __init__(self, model: nn.Module, group: ResolvedGroup, cfg: EstimatorConfig, loss_fn: LossFn):
        self.model = model
        self.group = group
        self.cfg = cfg
        self.loss_fn = loss_fn

    @abstractmethod
    def noise_size(self, x: torch.Tensor) -> int:
        """Noise numbers per query (``x``: the step's batch, for families that probe output sizes)."""

    def clean(
        self, task: ShardTask, x: torch.Tensor, y: torch.Tensor, groups: list[ResolvedGroup]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean losses ``(n,)``, embeddings ``(n, D)`` and trace proxies ``(n, G)`` of ``groups`` for the task's
        items (one pass of the model, the same whichever group's family runs it)."""
        pos = torch.tensor([it.pos for it in task.items], device=x.device)
        return clean_pass(self.model, groups, x[pos], y[pos], self.loss_fn)

    @abstractmethod
    def forward(self, shard: Shard) -> Evaluation:
        """The shard's perturbed forwards, in chunks of ``cfg.max_rows`` rows."""
