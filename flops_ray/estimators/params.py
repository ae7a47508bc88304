"""Parameter perturbation (SPSA, ES): query ``q`` evaluates ``theta + sigma * eps_q``; ``D_q = eps_q``.

SPSA uses antithetic pairs ``(+eps, -eps)``, whose two terms average to ``(L+ - L-)/(2 sigma) * eps``;
ES is one-sided with the clean-loss baseline.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.func import functional_call, vmap

from flops_ray.estimators.base import Estimator, Shard
from flops_ray.estimators.registry import register_estimator


@dataclass(frozen=True)
class NoiseEvaluation:
    """Losses of rows perturbed by ``eps (R, P_g)``, whose per-row direction is the noise itself."""

    losses: torch.Tensor
    eps: torch.Tensor

    def sums(self, w: torch.Tensor) -> torch.Tensor:
        return w.T @ self.eps.double()  # (S, P_g)

    def subsample(self, coef: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return coef[:, None] * self.eps[:, idx].double()


@register_estimator("spsa", "es")
class ParamEstimator(Estimator):
    """Perturbs the group's parameters; one vectorised (``vmap``) forward per chunk of rows."""

    def noise_size(self, x: torch.Tensor) -> int:
        return self.group.size

    def forward(self, shard: Shard) -> NoiseEvaluation:
        names = [n for n, _ in self.group.params]
        shapes = [p.shape for _, p in self.group.params]
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        base.update(dict(self.model.named_buffers()))
        model = self.model

        def one(delta_flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            chunks = torch.split(delta_flat, [s.numel() for s in shapes])
            params = dict(base)
            for n, d, s in zip(names, chunks, shapes):
                params[n] = base[n] + d.view(s)
            return functional_call(model, params, (x.unsqueeze(0),))[0]

        pos, losses = shard.rows.pos, []
        with warnings.catch_warnings():
            # vmap falls back to a loop for fused attention kernels; correct, only slower.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for sl in shard.rows.chunks(self.cfg.max_rows):
                out = vmap(one)(self.group.sigma * shard.eps[sl], shard.x[pos[sl]])
                losses.append(self.loss_fn(out, shard.y[pos[sl]]))
        return NoiseEvaluation(torch.cat(losses), shard.eps)
