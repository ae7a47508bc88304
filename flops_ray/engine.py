"""The query engine: one model replica that evaluates shards of perturbed forward passes.

A thin shell around the estimator families (:mod:`flops_ray.estimators`): it holds the replica's
parameters, the step's batch and the pilot cache, turns losses into coefficients
``c_q = (L_q - b_j)/sigma`` (``b_j`` the sample's clean loss, for every estimator) and reduces them into
weighted gradient sums and trace estimates. It imports no ray and touches no files: the same object runs
in-process and inside actors.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from flops_ray.config import EstimatorConfig, GroupConfig
from flops_ray.estimators import Evaluation, RowPlan, Shard, estimator_family, signed_noise
from flops_ray.groups import flatten, resolve_groups, to_numpy, unflatten_into
from flops_ray.losses import LossFn, cross_entropy
from flops_ray.messages import ShardResult, ShardTask, TaskKind
from flops_ray.seeding import STREAM_TRACE, generator


class NonFiniteLossError(FloatingPointError):
    """A query produced a NaN or inf loss; the message names the shard and the sample."""


class QueryEngine:
    """A model replica evaluating :class:`~flops_ray.messages.ShardTask` s.

    Args:
        model: the model; its group parameters are the trainable ones.
        groups: layer groups (see :class:`~flops_ray.config.GroupConfig`).
        estimator: estimator settings.
        root_seed: the run's root seed.
        loss_fn: per-sample loss ``(outputs (R, ...), targets (R,)) -> (R,)``.
        device: where the replica runs; noise is drawn on CPU and copied once per shard.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: tuple[GroupConfig, ...],
        estimator: EstimatorConfig,
        root_seed: int,
        loss_fn: LossFn = cross_entropy,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        family = estimator_family(estimator, self.model)
        self.groups = resolve_groups(self.model, groups, family.linear_outputs)
        self.estimators = [family(self.model, g, estimator, loss_fn) for g in self.groups]
        self.est = estimator
        self.root_seed = root_seed
        self.loss_fn = loss_fn
        self.dtype = next(self.model.parameters()).dtype
        self._low = getattr(torch, estimator.precision) if estimator.precision != "float32" else None
        self._step = -1
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._pilot_cache: dict[tuple[int, int], tuple] = {}
        """(group, index) -> the pilot's per-item sums, losses and (traces, dof)."""
        self._coords: dict[tuple[int, int], torch.Tensor] = {}
        self._skipped = 0

    # ---- parameters and batch -------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        """All group parameters, group by group, in flat order."""
        return [p for g in self.groups for _, p in g.params]

    def get_params(self) -> torch.Tensor:
        """``(P,)`` trainable parameters as one CPU vector."""
        return flatten([p.detach() for p in self.trainable()]).cpu()

    def set_params(self, flat: torch.Tensor | np.ndarray) -> None:
        """Load the ``(P,)`` trainable vector (one host-to-device copy)."""
        flat = torch.as_tensor(flat).to(self.device, self.dtype)
        with torch.no_grad():
            unflatten_into(flat, self.trainable())

    def set_batch(self, step: int, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> None:
        """Make ``(x, y)`` the batch of ``step``; forgets the previous step's pilot sums."""
        self._step = step
        x = torch.as_tensor(x)
        # Token ids and other integer inputs keep their dtype; only floating inputs follow the model's.
        self._x = x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)
        self._y = torch.as_tensor(y).to(self.device)
        self._pilot_cache.clear()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch ``x (B, ...)``, ``y (B,)`` on the replica's device."""
        if self._x is None:
            raise RuntimeError("no batch: call set_batch first")
        return self._x, self._y

    # ---- task dispatch ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, task: ShardTask) -> ShardResult:
        """Evaluate one shard task (see :class:`~flops_ray.messages.TaskKind` for the kinds)."""
        if self._x is None or task.step != self._step:
            raise RuntimeError(f"replica holds the batch of step {self._step}, task {task.key} needs step {task.step}")
        self._skipped = 0
        if task.kind == TaskKind.CLEAN:
            return self._clean(task)
        if task.kind == TaskKind.PILOT:
            _, losses, (traces, dof), forwards = self._pilot(task)
            return ShardResult(task.key, losses, traces=traces, trace_dof=dof, forwards=forwards, skipped=self._skipped)
        weights = torch.tensor(task.weights, dtype=torch.float64, device=self.device)
        if task.kind == TaskKind.FINALIZE:
            sums, losses, _, forwards = self._pilot(task)
            grad = (weights @ sums).cpu().numpy()
            return ShardResult(task.key, losses, grad=grad, forwards=forwards, skipped=self._skipped)
        rows, ev, coef = self._evaluate(task)
        grad = ev.sums((coef * weights[rows.item])[:, None])[0]
        traces, dof = self._item_traces(task, rows, ev, coef) if task.traces else (None, None)
        return ShardResult(
            task.key,
            to_numpy(ev.losses),
            grad=grad.cpu().numpy(),
            traces=traces,
            trace_dof=dof,
            forwards=len(rows),
            skipped=self._skipped,
        )

    def _forwards(self) -> contextlib.AbstractContextManager:
        """The precision of forward passes: ``estimator.precision`` under autocast, else the model's dtype."""
        if self._low is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._low)

    def _clean(self, task: ShardTask) -> ShardResult:
        with self._forwards():
            losses, emb, proxies = self.estimators[0].clean(task, self._x, self._y, self.groups)
        # A sample without a finite clean loss has no baseline to weight its queries by: always an error.
        self._check_finite(task, losses, [it.pos for it in task.items], skip=False)
        return ShardResult(
            task.key,
            losses.double().cpu().numpy(),
            embeddings=emb.double().cpu().numpy(),
            proxies=proxies.cpu().numpy(),
            forwards=len(task.items),
        )

    def _pilot(self, task: ShardTask):
        """Per-item gradient sums ``(n_items, P_g)`` (unweighted), losses, (traces, dof) and forwards run; cached."""
        key = (task.group, task.index)
        cached = self._pilot_cache.get(key)
        if cached is not None:
            return (*cached, 0)
        rows, ev, coef = self._evaluate(task)
        onehot = nn.functional.one_hot(rows.item, len(task.items)).to(torch.float64)
        sums = ev.sums(onehot * coef[:, None])
        self._pilot_cache[key] = (sums, to_numpy(ev.losses), self._item_traces(task, rows, ev, coef))
        return (*self._pilot_cache[key], len(rows))

    # ---- perturbed forwards, coefficients, traces --------------------------------------------------
    def _evaluate(self, task: ShardTask) -> tuple[RowPlan, Evaluation, torch.Tensor]:
        """The task's rows, their evaluation and ``(R,)`` coefficients ``c_q = (L_q - L_clean,j) / sigma`` (float64).

        The clean-loss baseline is subtracted for every estimator: it keeps the estimate unbiased
        (``E[eps] = 0`` given the upstream noise), cancels exactly within an SPSA pair, and within an LR
        pair it removes the ``L_clean * eps (h+ - h-)^T`` term that appears when a group's upstream
        module shifts the input ``h`` of a later one.
        """
        est = self.estimators[task.group]
        rows = RowPlan.of(task, self.est.unit, self.device, self.dtype)
        eps = signed_noise(self.root_seed, task, rows, est.noise_size(self._x), self.dtype, self.device)
        skip = self.est.on_nonfinite == "skip"
        with self._forwards():
            ev = est.forward(Shard(task, rows, self._x, self._y, eps, skip_errors=skip))
        self._check_finite(task, ev.losses, rows.pos.tolist(), skip)
        base = torch.tensor([it.baseline for it in task.items], dtype=torch.float64, device=self.device)
        coef = (ev.losses.double() - base[rows.item]) / est.group.sigma
        # Skipped (non-finite) queries contribute nothing; under "raise" none reach this point.
        return rows, ev, torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))

    def _check_finite(self, task: ShardTask, losses: torch.Tensor, pos: list[int], skip: bool) -> None:
        """Raise on a non-finite loss, or (``skip``) count it as skipped."""
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if not bad:
            return
        if skip:
            self._skipped += len(bad)
            return
        row = pos[bad[0]]
        sample = next(it.sample_id for it in task.items if it.pos == row)
        raise NonFiniteLossError(
            f"shard {task.key}: loss is {losses[bad[0]].item()} for batch row {row} "
            f"(sample {sample}; {len(bad)} non-finite of {len(pos)} queries); "
            "set estimator.on_nonfinite=skip to drop such queries instead"
        )

    def _trace_coords(self, step: int, group: int) -> torch.Tensor:
        """``(K,)`` sorted coordinates of the group sub-sampled for trace estimates (same on every replica)."""
        key = (step, group)
        if key not in self._coords:
            size = self.groups[group].size
            g = generator(self.root_seed, STREAM_TRACE, step, group)
            coords = torch.randperm(size, generator=g)[: min(self.est.trace_coords, size)].sort().values
            self._coords = {key: coords.to(self.device)}
        return self._coords[key]

    def _item_traces(self, task: ShardTask, rows: RowPlan, ev: Evaluation, coef: torch.Tensor):
        """Per item ``T_j ~ unit * (P/K) * sum_k Var_units[G_unit,k]`` from the task's sub-sampled terms, and
        its degrees of freedom (units - 1).

        A unit is one independent draw (a pair's mean for antithetic estimators); per-query variance is
        ``unit`` times the unit variance, which is what ``J(A) = sum T_j / A_j`` counts. An item with one
        draw in the task has no variance to measure: NaN with 0 degrees of freedom.
        """
        idx = self._trace_coords(task.step, task.group)
        sub = ev.subsample(coef, idx)  # (R, K)
        scale = self.groups[task.group].size / idx.numel()
        unit = self.est.unit
        traces, dof = np.full(len(task.items), np.nan), np.zeros(len(task.items))
        for i in range(len(task.items)):
            g = sub[rows.item == i]
            g = g.view(-1, unit, g.shape[-1]).mean(1)
            if len(g) > 1:
                traces[i] = unit * scale * g.var(dim=0, unbiased=True).sum().item()
                dof[i] = len(g) - 1
        return traces, dof
