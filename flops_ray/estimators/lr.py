"""Likelihood ratio on linear outputs: ``y = W h + b + sigma * eps`` for every ``nn.Linear`` of the group.

Per query, ``D_W = sum_t eps_t h_t^T`` and ``D_b = sum_t eps_t`` (``t`` over tokens); the inputs ``h`` and
noise ``eps`` of each perturbed linear are captured by forward hooks while the model runs.

A model with a ``token_mask(x) -> (R, tokens) bool`` (a causal LM: False at pad tokens) has its masked tokens
left out of ``D``: a pad token's output changes no loss, so its term would be pure noise. Such a model's noise
is laid out token by token (every linear of the group for token ``t``, then ``t + 1``), so a token's noise, and
with it the estimate, is the same however many pad tokens follow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from flops_ray.config.estimator import EstimatorConfig
from flops_ray.estimators.base import Estimator, Shard
from flops_ray.estimators.registry import register_estimator
from flops_ray.models.groups import ResolvedGroup


@dataclass(frozen=True)
class LinearEvaluation:
    """A chunk's losses plus, per perturbed linear ``m``, its inputs ``h[m] (r, ..., C_in)`` and noise
    ``e[m] (r, ..., C_out)``."""

    losses: torch.Tensor
    group: ResolvedGroup
    h: list[torch.Tensor]
    e: list[torch.Tensor]
    masked: bool = False
    """Rows may hold non-finite activations (``on_nonfinite = "skip"``): zero-weight rows are masked out."""
    tokens: torch.Tensor | None = None
    """``(r, T)`` the tokens whose terms count (the model's ``token_mask``); None: all."""

    def _tokens(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``h (r, T, C_in)`` and ``e (r, T, C_out)`` of linear ``m`` (``e`` zero at tokens that do not count)."""
        r = len(self.losses)
        h, e = self.h[m], self.e[m]
        h, e = h.reshape(r, -1, h.shape[-1]), e.reshape(r, -1, e.shape[-1])
        return h, e if self.tokens is None else torch.where(self.tokens[..., None], e, 0)

    def sums(self, w: torch.Tensor) -> torch.Tensor:
        """``sum_r w_r sum_t eps_rt h_rt^T`` (and ``sum_r w_r sum_t eps_rt`` for biases): one float32 matmul per
        linear over all ``r x T`` tokens of the chunk (over the tokens that count, when some do not)."""
        parts = []
        for m, (_, lin) in enumerate(self.group.linears):
            h, e = self._tokens(m)
            if self.masked:
                h = torch.where(w[:, None, None] != 0, h, 0)
            ew = e.float() * w[:, None, None]  # (r, T, C_out)
            if self.tokens is None:
                parts.append((ew.flatten(0, 1).T @ h.flatten(0, 1).float()).flatten())
                bias = ew.sum((0, 1))
            else:
                # Only the tokens that count enter the matmul, so its sum does not depend on how many do not.
                ew, h = ew[self.tokens], h[self.tokens]  # (n, C_out), (n, C_in)
                parts.append((ew.T @ h.float()).flatten())
                bias = ew.sum(0)
            if lin.bias is not None:
                parts.append(bias)
        return torch.cat(parts)

    def subsample(self, coef: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per-row terms at flat coordinates ``idx``: ``(r, K)`` without materialising ``(r, P_g)``."""
        cols = []
        offset = 0
        for m, (_, lin) in enumerate(self.group.linears):
            h, e = self._tokens(m)
            n_out, n_in = lin.weight.shape
            for is_bias, n in ((False, n_out * n_in), (True, n_out if lin.bias is not None else 0)):
                sel = idx[(idx >= offset) & (idx < offset + n)] - offset
                if sel.numel():
                    if is_bias:
                        cols.append(e[:, :, sel].float().sum(1))
                    else:
                        cols.append((e[:, :, sel // n_in].float() * h[:, :, sel % n_in].float()).sum(1))
                offset += n
        # A skipped row may carry non-finite activations; 0 * inf would put NaN into its trace.
        terms = coef[:, None] * torch.cat(cols, dim=1)
        return torch.where(coef[:, None] != 0, terms, 0.0)


@register_estimator("lr")
class LinearOutputEstimator(Estimator):
    """Perturbs the outputs of the group's linears through forward hooks; one plain forward per chunk."""

    linear_outputs = True
    terms_need_activations = True

    @classmethod
    def queries_per_draw(cls, cfg: EstimatorConfig) -> int:
        return 2 if cfg.antithetic else 1

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

    def _token_columns(self, sizes: list[int]) -> list[int] | None:
        """Where each linear's outputs sit in one token's noise, when the model masks tokens and every linear of
        the group sees the same tokens (the token-by-token layout); None: each linear's noise in one block."""
        widths = [lin.out_features for _, lin in self.group.linears]
        if not hasattr(self.model, "token_mask") or len({n // w for n, w in zip(sizes, widths)}) != 1:
            return None
        return np.cumsum([0, *widths]).tolist()

    def forward(self, shard: Shard) -> Iterator[tuple[slice, LinearEvaluation]]:
        sizes = self._output_numel(shard.x)
        offsets = np.cumsum([0, *sizes]).tolist()
        cols = self._token_columns(sizes)
        sigma = self.group.sigma
        captured: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.group.linears)
        current: dict[str, torch.Tensor] = {}

        def make_hook(m: int):
            def hook(module, inputs, out):
                if cols is None:
                    eps = current["eps"][:, offsets[m] : offsets[m + 1]].view(out.shape)
                else:
                    rows = current["eps"].view(len(current["eps"]), -1, cols[-1])  # (r, T, sum of widths)
                    eps = rows[..., cols[m] : cols[m + 1]].reshape(out.shape)
                captured[m] = (inputs[0].detach(), eps)
                return torch.add(out, eps, alpha=sigma)

            return hook

        pos = shard.rows.pos
        mask = getattr(self.model, "token_mask", None)
        with self._hooks(make_hook):
            for sl in shard.rows.chunks(self.cfg.max_rows):
                current["eps"] = shard.noise(sl).rows()
                losses = self.loss_fn(shard.outputs(sl, self.model, self.prefix), shard.y[pos[sl]])
                h, e = zip(*captured)
                tokens = None if mask is None else mask(shard.x[pos[sl]])
                yield sl, LinearEvaluation(losses, self.group, list(h), list(e), shard.skip_errors, tokens)
