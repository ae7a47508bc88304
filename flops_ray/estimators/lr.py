"""Likelihood ratio on linear outputs: ``y = W h + b + sigma * eps`` for every ``nn.Linear`` of the group.

Per query, ``D_W = sum_t eps_t h_t^T`` and ``D_b = sum_t eps_t`` (``t`` over tokens); the inputs ``h`` and
noise ``eps`` of each perturbed linear are captured by forward hooks while the model runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from flops_ray.estimators.base import Estimator, Shard
from flops_ray.estimators.registry import register_estimator
from flops_ray.groups import ResolvedGroup


@dataclass(frozen=True)
class LinearEvaluation:
    """Losses plus, per perturbed linear ``m``, its inputs ``h[m] (R, ..., C_in)`` and noise ``e[m] (R, ..., C_out)``."""

    losses: torch.Tensor
    group: ResolvedGroup
    h: list[torch.Tensor]
    e: list[torch.Tensor]

    def sums(self, w: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._segment_sum(w[:, s]) for s in range(w.shape[1])])  # (S, P_g)

    def _segment_sum(self, w: torch.Tensor) -> torch.Tensor:
        """``sum_r w_r sum_t eps_rt h_rt^T`` (and ``sum_r w_r sum_t eps_rt`` for biases), one matmul per linear.

        Only rows with ``w_r != 0`` enter, so a pilot's per-sample sums cost no more than one weighted sum.
        """
        rows = w.nonzero().flatten()
        wr = w[rows]
        parts = []
        for m, (_, lin) in enumerate(self.group.linears):
            hm = self.h[m][rows].double().reshape(len(rows), -1, self.h[m].shape[-1])  # (R, T, C_in)
            em = (
                self.e[m][rows].double().reshape(len(rows), -1, self.e[m].shape[-1]) * wr[:, None, None]
            )  # (R, T, C_out)
            parts.append((em.flatten(0, 1).T @ hm.flatten(0, 1)).flatten())
            if lin.bias is not None:
                parts.append(em.sum((0, 1)))
        return torch.cat(parts)

    def subsample(self, coef: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per-row terms at flat coordinates ``idx``: ``(R, K)`` without materialising ``(R, P_g)``."""
        cols = []
        offset = 0
        for m, (_, lin) in enumerate(self.group.linears):
            hm = self.h[m].double().reshape(self.h[m].shape[0], -1, self.h[m].shape[-1])
            em = self.e[m].double().reshape(self.e[m].shape[0], -1, self.e[m].shape[-1])
            n_out, n_in = lin.weight.shape
            for is_bias, n in ((False, n_out * n_in), (True, n_out if lin.bias is not None else 0)):
                sel = idx[(idx >= offset) & (idx < offset + n)] - offset
                if sel.numel():
                    if is_bias:
                        cols.append(em[:, :, sel].sum(1))
                    else:
                        cols.append((em[:, :, sel // n_in] * hm[:, :, sel % n_in]).sum(1))
                offset += n
        # A skipped row may carry non-finite activations; 0 * inf would put NaN into its trace.
        terms = coef[:, None] * torch.cat(cols, dim=1)
        return torch.where(coef[:, None] != 0, terms, 0.0)


@register_estimator("lr")
class LinearOutputEstimator(Estimator):
    """Perturbs the outputs of the group's linears through forward hooks; one plain forward per chunk."""

    linear_outputs = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._out_numel: list[int] | None = None

    @contextlib.contextmanager
    def _hooks(self, make_hook):
        handles = [lin.register_forward_hook(make_hook(m)) for m, (_, lin) in enumerate(self.group.linears)]
        try:
            yield
        finally:
            for hnd in handles:
                hnd.remove()

    def _output_numel(self, x: torch.Tensor) -> list[int]:
        """Per-sample output size of each of the group's linears, probed once with one clean sample."""
        if self._out_numel is None:
            sizes: dict[int, int] = {}

            def make_probe(m: int):
                def probe(module, inputs, out):
                    sizes[m] = out[0].numel()

                return probe

            with self._hooks(make_probe):
                self.model(x[:1])
            self._out_numel = [sizes[m] for m in range(len(self.group.linears))]
        return self._out_numel

    def noise_size(self, x: torch.Tensor) -> int:
        return sum(self._output_numel(x))

    def forward(self, shard: Shard) -> LinearEvaluation:
        offsets = np.cumsum([0, *self._output_numel(shard.x)]).tolist()
        sigma = self.group.sigma
        captured: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.group.linears]
        current: dict[str, torch.Tensor] = {}

        def make_hook(m: int):
            def hook(module, inputs, out):
                eps = current["eps"][:, offsets[m] : offsets[m + 1]].view(out.shape)
                captured[m].append((inputs[0].detach(), eps))
                return out + sigma * eps

            return hook

        pos, losses = shard.rows.pos, []
        with self._hooks(make_hook):
            for sl in shard.rows.chunks(self.cfg.max_rows):
                current["eps"] = shard.eps[sl]
                out = self.model(shard.x[pos[sl]])
                losses.append(self.loss_fn(out, shard.y[pos[sl]]))
        h = [torch.cat([c[0] for c in v]) for v in captured]
        e = [torch.cat([c[1] for c in v]) for v in captured]
        return LinearEvaluation(torch.cat(losses), self.group, h, e)
