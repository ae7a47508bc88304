"""Black boxes (SPSA, ES): the user's function sees searched vectors ``u + sigma * eps`` and answers losses.

One call of the user's function per chunk of rows (``estimator.max_rows``), never one per query;
errors name the shard and the samples of the failing call.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from flops_ray.estimators.base import Estimator, Shard
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
        self, task: ShardTask, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, skip: bool
    ) -> torch.Tensor:
        """The box on rows ``u (R, d)`` at batch positions ``pos (R,)``; with ``skip`` a failing call gives NaNs."""
        try:
            with torch.inference_mode(self.model.inference):
                return self.model.losses(u, x[pos], y[pos])
        except BlackBoxError as exc:
            if skip and not isinstance(exc, BlackBoxShapeError):
                # The policy drops the whole call: its rows become non-finite and are counted as skipped.
                return torch.full((len(u),), float("nan"), dtype=u.dtype, device=u.device)
            samples = sorted({sample_of(task, r) for r in pos.tolist()})
            raise type(exc)(f"shard {task.key}, samples {samples}: {exc}") from exc

    def clean(
        self, task: ShardTask, x: torch.Tensor, y: torch.Tensor, groups: list[ResolvedGroup]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.tensor([it.pos for it in task.items], device=x.device)
        u = self.model.search.value.detach()
        losses = self.losses(task, u.expand(len(pos), -1), x, y, pos, skip=False)
        # A black box has no embedding and no gradient to offer: its inputs stand in for the allocator's
        # kernel, and the trace memory for the proxy.
        proxy = torch.full((len(pos), len(groups)), float("nan"), dtype=torch.float64, device=x.device)
        return losses, x[pos].flatten(1), proxy

    def forward(self, shard: Shard) -> Iterator[tuple[slice, NoiseEvaluation]]:
        u = self.group.params[0][1].detach()
        pos = shard.rows.pos
        for sl in shard.rows.chunks(self.cfg.max_rows):
            noise = shard.noise(sl)
            searched = noise.rows(self.group.sigma, u)
            yield (
                sl,
                NoiseEvaluation(self.losses(shard.task, searched, shard.x, shard.y, pos[sl], shard.skip_errors), noise),
            )
