"""The query engine: evaluates shards of perturbed forward passes on one copy of the model.

A thin shell around the estimator families (:mod:`flops_ray.estimators`): it holds the copy's
parameters and the step's batch, turns losses into coefficients
``c_q = (L_q - b_j)/sigma`` (``b_j`` the sample's clean loss, for every estimator) and reduces them into
weighted gradient sums and trace estimates (:mod:`flops_ray.replica.traces`). A
:class:`~flops_ray.replica.replica.Replica` adds the optimizer and the version of the parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flops_ray.config import EstimatorConfig, GroupConfig
from flops_ray.estimators import RowPlan, Shard, estimator_family, queries_per_draw
from flops_ray.messages import ShardResult, ShardTask, TaskKind
from flops_ray.models.groups import flatten, resolve_groups, to_numpy, unflatten_into
from flops_ray.models.losses import LossFn, cross_entropy
from flops_ray.replica.heap import keep_freed_memory
from flops_ray.replica.ordered_sum import AllGather
from flops_ray.replica.replay import replay_gradients, sliced_replay
from flops_ray.replica.traces import TraceSampler


class NonFiniteLossError(FloatingPointError):
    """A query produced a NaN or inf loss; the message names the shard and the sample."""


class QueryEngine:
    """Evaluates :class:`~flops_ray.messages.ShardTask` s on one copy of the model.

    Args:
        model: the model; its group parameters are the trainable ones.
        groups: layer groups (see :class:`~flops_ray.config.train.GroupConfig`).
        estimator: estimator settings.
        root_seed: the run's root seed.
        loss_fn: per-sample loss ``(outputs (R, ...), targets (R,)) -> (R,)``.
        device: where the model runs; noise is made there, chunk by chunk (:mod:`flops_ray.estimators.noise`).
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
        if self.device.type == "cpu":
            keep_freed_memory()  # chunks reuse the pages the last one freed
        self.model = model.to(self.device).eval()
        family = estimator_family(estimator, self.model)
        self.scalar = not (family.linear_outputs or family.terms_need_activations)
        """Whether a shard's gradient is ``sum_d c_d z_d`` over its noise draws (SPSA/ES), so it can travel as its
        per-draw coefficients (the scalar protocol, :mod:`flops_ray.replica.replay`)."""
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
        sizes = [g.size for g in self.groups]
        self.trace_sampler = TraceSampler(
            sizes, estimator.trace_coords, queries_per_draw(estimator), root_seed, self.device
        )
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
        """Make ``(x, y)`` the batch of ``step``."""
        self._step = step
        x = torch.as_tensor(x)
        # Token ids and other integer inputs keep their dtype; only floating inputs follow the model's.
        self._x = x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)
        self._y = torch.as_tensor(y).to(self.device)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch ``x (B, ...)``, ``y (B,)`` on the replica's device."""
        if self._x is None:
            raise RuntimeError("no batch: call set_batch first")
        return self._x, self._y

    # ---- task dispatch ---------------------------------------------------------------------------
    def run(self, task: ShardTask, coefficients: bool = False) -> ShardResult:
        """Evaluate one shard task (see :class:`~flops_ray.messages.TaskKind` for the kinds); with ``coefficients``
        (SPSA/ES only) a weighted task returns its per-draw coefficients instead of its gradient sum."""
        result, grad = self.run_on_device(task, coefficients)
        return result if grad is None else dataclasses.replace(result, grad=grad.cpu().numpy())

    @torch.no_grad()
    def run_on_device(self, task: ShardTask, coefficients: bool = False) -> tuple[ShardResult, torch.Tensor | None]:
        """:meth:`run`, with the weighted gradient sum ``(P_g,)`` float32 left on the replica's device (for a
        reduction that sums it there) instead of in the result."""
        if self._x is None or task.step != self._step:
            raise RuntimeError(f"replica holds the batch of step {self._step}, task {task.key} needs step {task.step}")
        if coefficients and not self.scalar:
            raise ValueError(
                f"estimator {self.est.kind!r} has no per-draw coefficients: its terms depend on activations"
            )
        self._skipped = 0
        if task.kind == TaskKind.CLEAN:
            return self._clean(task), None
        losses, grad, coefs, traces, dof = self._evaluate(task, coefficients)
        result = ShardResult(
            task.key, losses, coefs=coefs, traces=traces, trace_dof=dof, forwards=task.cost, skipped=self._skipped
        )
        return result, grad

    def replay(
        self,
        tasks: Sequence[ShardTask],
        coefs: Sequence[np.ndarray],
        rank: int = 0,
        world: int = 1,
        exchange: AllGather | None = None,
    ) -> list[torch.Tensor]:
        """Per group ``(P_g,)`` float64 gradient sums rebuilt from the weighted tasks' per-draw coefficients; with
        ``exchange`` (an all-gather among ``world`` members, this one ``rank``), only this member's share of the
        slices is rebuilt and the rest gathered (:func:`sliced_replay`): the same bits."""
        layouts = [est.noise_layout(self._x) for est in self.estimators]
        unit = queries_per_draw(self.est)
        if exchange is None:
            return replay_gradients(tasks, coefs, layouts, unit, self.root_seed, self.device)
        return sliced_replay(tasks, coefs, layouts, unit, self.root_seed, self.device, rank, exchange, world)

    def forward_precision(self) -> contextlib.AbstractContextManager:
        """The precision of forward passes: ``estimator.precision`` under autocast, else the model's dtype."""
        if self._low is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._low)

    def _clean(self, task: ShardTask) -> ShardResult:
        with self.forward_precision():
            losses, emb, proxies = self.estimators[0].clean(task, self._x, self._y, self.groups)
        # A sample without a finite clean loss has no baseline to weight its queries by: always an error.
        host = to_numpy(losses)
        self._check_finite(task, host, np.arange(len(task.items)), skip=False)
        return ShardResult(
            task.key,
            host.astype(np.float64),
            embeddings=emb.double().cpu().numpy(),
            proxies=proxies.cpu().numpy(),
            forwards=len(task.items),
        )

    # ---- perturbed forwards, coefficients, traces --------------------------------------------------
    def _evaluate(
        self, task: ShardTask, coefficients: bool
    ) -> tuple[np.ndarray, torch.Tensor | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The task's perturbed losses ``(R,)``, its weighted gradient sum ``(P_g,)`` or (``coefficients``) per-draw
        coefficients ``(D,)`` (``main``), and per-item traces and their degrees of freedom
        (``pilot``, ``main`` with ``traces``).

        Each chunk's coefficients ``c_q = (L_q - L_clean,j) / sigma`` weight its terms as soon as it has run
        (float32 on the device), so nothing per row outlives its chunk but ``K`` trace coordinates. The clean-loss
        baseline is subtracted for every estimator: it keeps the estimate unbiased (``E[eps] = 0`` given the
        upstream noise), cancels exactly within an SPSA pair, and within an LR pair it removes the
        ``L_clean * eps (h+ - h-)^T`` term that appears when a group's upstream module shifts the input ``h``
        of a later one.
        """
        est = self.estimators[task.group]
        rows = RowPlan.of(task, queries_per_draw(self.est), self.root_seed, self.device)
        skip = self.est.on_nonfinite == "skip"
        shard = Shard(task, rows, self._x, self._y, est.noise_layout(self._x), self.dtype, skip_errors=skip)
        base = torch.tensor([it.baseline for it in task.items], dtype=torch.float64, device=self.device)
        weights = None if task.weights is None else torch.tensor(task.weights, dtype=torch.float32, device=self.device)
        idx = self.trace_sampler.coords(task.step, task.group) if task.traces or task.kind == TaskKind.PILOT else None
        # Per draw, its unweighted sum of sign * coefficient: weighted by its item's weight at the end.
        raw = torch.zeros(len(rows.keys), device=self.device) if coefficients and weights is not None else None
        grad = None
        if weights is not None and not coefficients:
            grad = torch.zeros(est.group.size, dtype=torch.float32, device=self.device)
        losses, subs = [], []
        with self.forward_precision():
            for sl, ev in est.forward(shard):
                # The difference in the losses' own precision (a float64 model keeps its digits), then float32.
                coef = ((ev.losses.double() - base[rows.item[sl]]) / est.group.sigma).float()
                # Skipped (non-finite) queries contribute nothing; under "raise" the task fails below.
                coef = torch.where(torch.isfinite(coef), coef, 0.0)
                with torch.autocast(self.device.type, enabled=False):  # sums stay float32 under autocast
                    if grad is not None:
                        grad += ev.sums(coef * weights[rows.item[sl]])
                    if raw is not None:
                        raw.index_add_(0, rows.draw[sl], coef * rows.sign[sl])
                    if idx is not None:
                        subs.append(ev.subsample(coef, idx))
                losses.append(ev.losses)
        host = to_numpy(torch.cat(losses))
        self._check_finite(task, host, np.repeat(np.arange(len(task.items)), [it.cost for it in task.items]), skip)
        traces = self.trace_sampler.item_traces(task, rows, torch.cat(subs)) if idx is not None else (None, None)
        draw_item = None if raw is None else torch.zeros_like(rows.keys).scatter_(0, rows.draw, rows.item)
        coefs = None if raw is None else to_numpy(raw * weights[draw_item])
        return host, grad, coefs, *traces

    def _check_finite(self, task: ShardTask, losses: np.ndarray, items: np.ndarray, skip: bool) -> None:
        """Raise on a non-finite loss (``items``: the task item of each), or (``skip``) count it as skipped."""
        bad = np.flatnonzero(~np.isfinite(losses))
        if not len(bad):
            return
        if skip:
            self._skipped += len(bad)
            return
        it = task.items[items[bad[0]]]
        raise NonFiniteLossError(
            f"shard {task.key}: loss is {losses[bad[0]]} for batch row {it.pos} "
            f"(sample {it.sample_id}; {len(bad)} non-finite of {len(losses)} queries); "
            "set estimator.on_nonfinite=skip to drop such queries instead"
        )
