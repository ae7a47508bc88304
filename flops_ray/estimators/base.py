"""The estimator protocol, the typed row plan of a shard, and its noise.

Per query ``q`` of sample ``j`` in group ``g`` the replica computes a term ``c_q D_q`` with
``c_q = (L_q - b_j) / sigma`` (paper eqs. 1-3, docs/DESIGN.md section 1); a family says how a
shard's perturbed losses are computed and what ``D_q`` is. Every term is additive, so a sample's
estimate over ``[q0, q1)`` can be computed in pieces and summed.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from flops_ray.allocation.trace_proxy import clean_pass
from flops_ray.config import EstimatorConfig
from flops_ray.estimators.noise import draw_keys, gaussian
from flops_ray.estimators.noise_layout import NoiseLayout
from flops_ray.estimators.prefix import SharedPrefix
from flops_ray.messages import ShardTask
from flops_ray.models.groups import ResolvedGroup
from flops_ray.models.losses import LossFn


@dataclass(frozen=True)
class RowPlan:
    """A shard expanded into perturbed rows, one per query, built with tensor ops (no per-query Python).

    Row fields are ``(R,)`` on the replica's device; ``keys`` holds the shard's distinct noise draws.
    """

    pos: torch.Tensor
    """Row of the query's sample in the step's batch."""
    item: torch.Tensor
    """Index of the query's item in the task."""
    item_pos: torch.Tensor
    """``(I,)`` row of each item's sample in the step's batch."""
    sign: torch.Tensor
    """``+1``, or ``-1`` for the second query of an antithetic pair (float32)."""
    draw: torch.Tensor
    """Index of the query's noise draw in ``keys``."""
    keys: torch.Tensor
    """``(D,)`` int64 keys of the distinct draws (:func:`flops_ray.estimators.noise.draw_keys`), in first-use order."""
    host_draw: tuple[int, ...]
    """On the host: ``draw`` of every row, so a chunk's draws are known without asking the device."""
    host_item: tuple[int, ...]
    """On the host: ``item`` of every row, so a chunk's samples are known without asking the device."""
    unit: int
    """Queries per draw: 2 for antithetic pairs, else 1."""

    @classmethod
    def of(cls, task: ShardTask, unit: int, root_seed: int, device: torch.device) -> RowPlan:
        """Expand ``task``'s items: query ``q`` uses draw ``q // unit``, negated when odd within a pair."""
        columns = zip(*[(it.pos, it.sample_id, it.q0, it.q1) for it in task.items])
        pos, sample, q0, q1 = (torch.tensor(col, dtype=torch.int64) for col in columns)
        counts = q1 - q0  # (I,)
        item = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (R,)
        q = q0[item] + torch.arange(len(item)) - (torch.cumsum(counts, 0) - counts)[item]
        keys, draw = torch.unique_consecutive(
            draw_keys(root_seed, task.step, task.group, sample[item], q // unit), return_inverse=True
        )
        sign = 1.0 - 2.0 * (q % 2 == 1).float() if unit == 2 else torch.ones(len(q))
        return cls(
            pos=pos[item].to(device),
            item=item.to(device),
            item_pos=pos.to(device),
            sign=sign.to(device),
            draw=draw.to(device),
            keys=keys.to(device),
            host_draw=tuple(draw.tolist()),
            host_item=tuple(item.tolist()),
            unit=unit,
        )

    def __len__(self) -> int:
        return len(self.pos)

    def chunks(self, max_rows: int) -> list[slice]:
        """Row slices of at most ``max_rows`` (one batched forward each)."""
        return [slice(s, min(len(self), s + max_rows)) for s in range(0, len(self), max_rows)]

    def samples(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows``' samples as batch rows ``(u,)``, one per item, and each row's index into them ``(r,)``."""
        lo, hi = self.host_item[rows.start], self.host_item[rows.stop - 1] + 1
        return self.item_pos[lo:hi], self.item[rows] - lo

    def draws(self, rows: slice, layout: NoiseLayout, dtype: torch.dtype) -> Draws:
        """The distinct draws of ``rows``, each made once on the device (``dtype``: the model's)."""
        chunk = self.host_draw[rows]
        lo, hi = chunk[0], chunk[-1] + 1
        # Rows that take the draws in order, each once or each twice (a whole pair), need no gather.
        runs = len(chunk) // (hi - lo)
        in_order = runs in (1, self.unit) and chunk == tuple(d for d in range(lo, hi) for _ in range(runs))
        streams = gaussian(self.keys[lo:hi], layout.normals)
        return Draws(streams, layout, self.draw[rows] - lo, self.sign[rows], dtype, in_order)


@dataclass(frozen=True)
class Draws:
    """A chunk's noise as its distinct draws: row ``r``'s noise is ``sign[r] * z[draw[r]]``."""

    streams: torch.Tensor
    """``(d, normals)`` each draw's normals (float32), which ``layout`` lays out into the draw."""
    layout: NoiseLayout
    draw: torch.Tensor
    """``(r,)`` each row's draw."""
    sign: torch.Tensor
    """``(r,)`` each row's sign (float32)."""
    dtype: torch.dtype
    """The model's dtype, that of the rows handed to it."""
    in_order: bool = False
    """The rows take the draws in order, each draw once or twice in a row (a whole antithetic pair)."""

    @functools.cached_property
    def z(self) -> torch.Tensor:
        """``(d, size)`` the draws (float32), formed when first read: rank-1 draws weigh, give trace coordinates
        and run their linears without it."""
        return self.layout.expand(self.streams)

    def rows(self, scale: float = 1.0, offset: torch.Tensor | None = None) -> torch.Tensor:
        """``(r, size)`` ``offset + scale * sign_r z_draw_r`` in the model's dtype (a float64 model's ``offset``
        keeps its digits): one pass over the rows when they take the draws in order, else a gather first."""
        z = self.z.to(self.dtype)
        signs = (scale * self.sign).to(self.dtype)
        if self.in_order:
            d = len(z)
            signs = signs.view(d, -1, 1)  # (d, r / d, 1)
            out = z[:, None, :] * signs if offset is None else torch.addcmul(offset, z[:, None, :], signs)
            return out.view(len(self.draw), -1)
        out = torch.index_select(z, 0, self.draw)
        out.mul_(signs[:, None])
        return out if offset is None else out.add_(offset)

    def weigh(self, w: torch.Tensor) -> torch.Tensor:
        """``(size,)`` float32 ``sum_r w_r sign_r z_draw_r`` (``w (r,)``: the rows' weights), read per draw."""
        per_draw = torch.zeros(len(self.streams), dtype=torch.float32, device=self.streams.device)
        per_draw.index_add_(0, self.draw, w.float() * self.sign)
        return self.layout.weigh_streams(self.streams, per_draw)

    def at(self, idx: torch.Tensor) -> torch.Tensor:
        """``(r, K)`` the rows' noise at coordinates ``idx``."""
        return self.layout.coordinates(self.streams, idx)[self.draw] * self.sign[:, None]


@dataclass(frozen=True)
class Shard:
    """What a family needs to evaluate one shard on a replica."""

    task: ShardTask
    rows: RowPlan
    x: torch.Tensor
    """``(B, ...)`` the step's batch on the replica's device."""
    y: torch.Tensor
    """``(B,)`` targets."""
    noise_layout: NoiseLayout
    """How a query's noise fills its vector (:meth:`Estimator.noise_layout`)."""
    dtype: torch.dtype
    """The model's dtype, in which the rows' noise is handed over (it is made in float32)."""
    skip_errors: bool = False
    """``estimator.on_nonfinite = "skip"``: a failing black-box call drops its rows instead of raising."""

    def noise(self, rows: slice) -> Draws:
        """The noise of ``rows``, made on the device when their chunk runs."""
        return self.rows.draws(rows, self.noise_layout, self.dtype)

    def outputs(
        self, rows: slice, forward: Callable[[torch.Tensor], torch.Tensor], prefix: SharedPrefix
    ) -> torch.Tensor:
        """Model outputs of ``rows`` by ``forward`` (the model with the chunk's perturbation in place), the blocks
        before the group run once per sample where ``prefix`` allows."""
        first, fan = self.rows.samples(rows)
        with torch.inference_mode():  # no version counters or view tracking: a query needs neither
            return prefix.run(forward, self.x, first, fan)


class Evaluation(Protocol):
    """One chunk's perturbed losses and the linear maps from per-row weights to gradient sums."""

    losses: torch.Tensor
    """``(r,)`` perturbed losses."""

    def sums(self, w: torch.Tensor) -> torch.Tensor:
        """``(P_g,)`` float32 sum ``sum_r w_r D_r`` over the chunk's rows, with ``w (r,)`` their weights (rows with
        ``w_r = 0`` add nothing, even when their activations are not finite)."""

    def subsample(self, coef: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(r, K)`` per-row terms ``coef_r D_r[idx]`` at flat coordinates ``idx (K,)``."""


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
    terms_need_activations = False
    """Whether a query's gradient term depends on the replica's activations, not only on its draw: such terms
    cannot be rebuilt from seeds and per-draw coefficients (``farm.reduction: scalar``)."""
    paired_kinds: tuple[str, ...] = ()
    """The kinds this family serves with antithetic pairs (two queries share a draw)."""

    @classmethod
    def queries_per_draw(cls, cfg: EstimatorConfig) -> int:
        """Queries sharing one noise draw: 2 for an antithetic pair, else 1."""
        return 2 if cfg.kind in cls.paired_kinds else 1

    def __init__(self, model: nn.Module, group: ResolvedGroup, cfg: EstimatorConfig, loss_fn: LossFn):
        self.model = model
        self.group = group
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.prefix = SharedPrefix(model, group, cfg)
        """Where a chunk's rows fan out from its samples (families that run the model's blocks)."""

    @abstractmethod
    def noise_size(self, x: torch.Tensor) -> int:
        """Noise numbers per query (``x``: the step's batch, for families that probe output sizes)."""

    def noise_layout(self, x: torch.Tensor) -> NoiseLayout:
        """How a query's :meth:`noise_size` numbers are drawn: independent normals unless a family says else."""
        return NoiseLayout.dense(self.noise_size(x))

    def clean(
        self, task: ShardTask, x: torch.Tensor, y: torch.Tensor, groups: list[ResolvedGroup]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean losses ``(n,)``, embeddings ``(n, D)`` and trace proxies ``(n, G)`` of ``groups`` for the task's
        items (one pass of the model, the same whichever group's family runs it)."""
        pos = torch.tensor([it.pos for it in task.items], device=x.device)
        return clean_pass(self.model, groups, x[pos], y[pos], self.loss_fn)

    @abstractmethod
    def forward(self, shard: Shard) -> Iterator[tuple[slice, Evaluation]]:
        """The shard's perturbed forwards, one chunk of at most ``cfg.max_rows`` rows at a time: each chunk's
        noise is made when it runs and its evaluation is reduced by the caller before the next chunk, so a
        replica holds one chunk's noise and activations whatever the shard's size."""
