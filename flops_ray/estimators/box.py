"""Black boxes: the user's function sees perturbed parameters and answers losses.

SPSA and ES perturb the searched vector ``u`` (``theta = theta0 + (u + sigma eps) W``); LR perturbs the output of
the linear parameterisation, ``theta = theta0 + u W + sigma eps`` (paper section 5.2: the prompt ``p = z W`` is the
perturbed linear output), and maps each term back to ``u`` through the linear's Jacobian: ``D_q = W eps_q``
(eq. 1 with ``D^theta_u = W^T``).

One call of the user's function per chunk of rows (``estimator.max_rows``), never one per query;
errors name the shard and the samples of the failing call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from flops_ray.config.estimator import EstimatorConfig
from flops_ray.estimators.base import Draws, Estimator, Shard
from flops_ray.estimators.params import NoiseEvaluation
from flops_ray.estimators.registry import register_estimator
from flops_ray.messages import ShardTask
from flops_ray.models.blackbox import BlackBoxError, BlackBoxShapeError
from flops_ray.models.groups import ResolvedGroup


def sample_of(task: ShardTask, row: int) -> int:
    """Dataset index of the sample at batch row ``row`` of ``task``."""
    return next(it.sample_id for it in task.items if it.pos == row)


@register_estimator("spsa", "es", blackbox=True)
class BlackBoxEstimator(Estimator):
    """Perturbs the box's searched vector ``u``; SPSA pairs or ES with the clean-loss baseline."""

    paired_kinds = ("spsa",)

    def noise_size(self, x: torch.Tensor) -> int:
        return self.group.size

    def losses(
        self, task: ShardTask, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, skip: bool
    ) -> torch.Tensor:
        """The box on full parameter rows ``thetas (R, D)`` at batch positions ``pos (R,)``; with ``skip`` a failing
        call gives NaNs."""
        try:
            with torch.inference_mode(self.model.inference):
                return self.model.losses_at(thetas, x[pos], y[pos])
        except BlackBoxError as exc:
            if skip and not isinstance(exc, BlackBoxShapeError):
                # The policy drops the whole call: its rows become non-finite and are counted as skipped.
                return torch.full((len(thetas),), float("nan"), dtype=thetas.dtype, device=thetas.device)
            samples = sorted({sample_of(task, r) for r in pos.tolist()})
            raise type(exc)(f"shard {task.key}, samples {samples}: {exc}") from exc

    def clean(
        self, task: ShardTask, x: torch.Tensor, y: torch.Tensor, groups: list[ResolvedGroup]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.tensor([it.pos for it in task.items], device=x.device)
        u = self.model.search.value.detach()
        losses = self.losses(task, self.model.thetas(u[None]).expand(len(pos), -1), x, y, pos, skip=False)
        # A black box has no embedding and no gradient to offer: its inputs stand in for the allocator's
        # kernel, and the trace memory for the proxy.
        proxy = torch.full((len(pos), len(groups)), float("nan"), dtype=torch.float64, device=x.device)
        return losses, x[pos].flatten(1), proxy

    def forward(self, shard: Shard) -> Iterator[tuple[slice, NoiseEvaluation]]:
        u = self.group.params[0][1].detach()
        pos = shard.rows.pos
        for sl in shard.rows.chunks(self.cfg.max_rows):
            noise = shard.noise(sl)
            thetas = self.model.thetas(noise.rows(self.group.sigma, u))
            yield (
                sl,
                NoiseEvaluation(self.losses(shard.task, thetas, shard.x, shard.y, pos[sl], shard.skip_errors), noise),
            )


@dataclass(frozen=True)
class ProjectedEvaluation:
    """A chunk's losses of rows whose parameters ``theta`` were perturbed by their noise ``eps (D,)``; each row's
    direction in ``u`` is the noise mapped back through the linear parameterisation, ``W eps (d,)``."""

    losses: torch.Tensor
    noise: Draws
    projection: torch.Tensor | None
    """``W (d, D)``; None: ``theta = theta0 + u`` (``W`` the identity)."""

    def sums(self, w: torch.Tensor) -> torch.Tensor:
        """``(d,)`` ``W sum_r w_r eps_r``: one matrix-vector product per chunk, after the noise is summed in ``D``."""
        g_theta = self.noise.weigh(w)  # (D,) the estimate in theta, which is p's space
        return g_theta if self.projection is None else self.projection.float() @ g_theta

    def subsample(self, coef: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(r, K)`` per-row terms ``coef_r (W eps_r)[idx]``."""
        if self.projection is None:
            return coef[:, None] * self.noise.at(idx)
        return coef[:, None] * (self.noise.rows().float() @ self.projection[idx].float().T)


@register_estimator("lr", blackbox=True)
class BlackBoxOutputEstimator(BlackBoxEstimator):
    """LR on the box's linear parameterisation: perturbs ``theta = theta0 + u W`` (the linear's output) by
    ``sigma eps``, ``eps ~ N(0, I_D)``, antithetic pairs as LR's, and weighs ``W eps`` into the estimate of ``u``."""

    paired_kinds = ()
    terms_need_activations = True
    """A term is ``W eps``, not the noise itself: it cannot be rebuilt from per-draw coefficients as SPSA's is."""

    @classmethod
    def queries_per_draw(cls, cfg: EstimatorConfig) -> int:
        return 2 if cfg.antithetic else 1

    def noise_size(self, x: torch.Tensor) -> int:
        return self.model.theta0.numel()

    def forward(self, shard: Shard) -> Iterator[tuple[slice, ProjectedEvaluation]]:
        base = self.model.theta()[None]  # (1, D) theta at the current u
        pos = shard.rows.pos
        for sl in shard.rows.chunks(self.cfg.max_rows):
            noise = shard.noise(sl)
            thetas = noise.rows(self.group.sigma, base)
            losses = self.losses(shard.task, thetas, shard.x, shard.y, pos[sl], shard.skip_errors)
            yield sl, ProjectedEvaluation(losses, noise, self.model.projection)
