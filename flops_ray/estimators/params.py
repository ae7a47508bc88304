"""Parameter perturbation (SPSA, ES): query ``q`` evaluates ``theta + sigma * eps_q``; ``D_q = eps_q``.

SPSA uses antithetic pairs ``(+eps, -eps)``, whose two terms average to ``(L+ - L-)/(2 sigma) * eps``;
ES is one-sided with the clean-loss baseline.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from flops_ray.estimators.base import Draws, Estimator, Shard
from flops_ray.estimators.registry import register_estimator
from flops_ray.groups import ResolvedGroup, flatten
from flops_ray.noise import NoiseLayout


@dataclass(frozen=True)
class NoiseEvaluation:
    """A chunk's losses of rows perturbed by their noise, whose per-row direction is the noise itself."""

    losses: torch.Tensor
    noise: Draws

    def sums(self, w: torch.Tensor) -> torch.Tensor:
        return self.noise.weigh(w)  # (P_g,)

    def subsample(self, coef: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return coef[:, None] * self.noise.at(idx)


class _NotBatchFirst(Exception):
    """A perturbed module cannot run per row on its own: no input whose leading dimension is the chunk's rows,
    keyword arguments, or an output that is not one tensor."""


class _PerRow(nn.Module):
    """Stands in for a module of the group while a chunk runs: the module under ``vmap``, each row with its own
    parameters ``theta + sigma eps_r``, so only the group's own modules pay for per-row parameters."""

    def __init__(self, inner: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.inner = inner
        self.params = params
        """Local parameter name -> ``(r, *shape)`` perturbed values."""

    def forward(self, *args: torch.Tensor, **kwargs) -> torch.Tensor:
        rows = next(iter(self.params.values())).shape[0]
        dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == rows else None for a in args)
        if 0 not in dims or kwargs:
            raise _NotBatchFirst

        def one(params: dict[str, torch.Tensor], *row_args) -> torch.Tensor:
            batched = tuple(a.unsqueeze(0) if dim == 0 else a for a, dim in zip(row_args, dims))
            out = functional_call(self.inner, params, batched)
            if not isinstance(out, torch.Tensor):
                raise _NotBatchFirst  # a tuple of outputs (attention, recurrent modules): the whole-model path
            return out[0]

        return vmap(one, in_dims=(0, *dims))(self.params, *args)


def _owners(group: ResolvedGroup) -> dict[str, list[tuple[str, int, torch.Size]]]:
    """Outermost modules owning the group's parameters -> ``(local name, flat offset, shape)`` of each."""
    flat, offset = [], 0
    for name, p in group.params:
        flat.append((name, offset, p.shape))
        offset += p.numel()
    owners = {name.rpartition(".")[0] for name, _, _ in flat}
    outer = sorted(o for o in owners if not any(o.startswith(f"{a}.") or not a for a in owners - {o}))
    return {
        o: [(n[len(o) + 1 :] if o else n, off, shape) for n, off, shape in flat if not o or n.startswith(f"{o}.")]
        for o in outer
    }


@register_estimator("spsa", "es")
class ParamEstimator(Estimator):
    """Perturbs the group's parameters: each module owning them runs under ``vmap`` with per-row parameters,
    the rest of the model as a plain batched forward (the whole model under ``vmap`` when a module's input
    is not batch-first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owners = _owners(self.group)
        names = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        # A parameter shared by several modules must be perturbed in all of them: only the whole model does.
        tied = any(names[id(p)] > 1 for _, p in self.group.params)
        self._whole_model = "" in self._owners or tied

    def noise_size(self, x: torch.Tensor) -> int:
        return self.group.size

    def noise_layout(self, x: torch.Tensor) -> NoiseLayout:
        """``estimator.noise``: dense normals, or rank-1 blocks for the group's matrices."""
        return NoiseLayout.of([p.shape for _, p in self.group.params], self.cfg.noise == "rank1")

    @contextlib.contextmanager
    def _per_row(self, theta: torch.Tensor) -> Iterator[None]:
        """Swap each owning module for a :class:`_PerRow` of it with ``theta (r, P_g)``'s slices."""
        originals = {o: self.model.get_submodule(o) for o in self._owners}
        try:
            for o, params in self._owners.items():
                parent, _, child = o.rpartition(".")
                rows = {n: theta[:, off : off + shape.numel()].view(-1, *shape) for n, off, shape in params}
                setattr(self.model.get_submodule(parent), child, _PerRow(originals[o], rows))
            yield
        finally:
            for o, module in originals.items():
                parent, _, child = o.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module)

    def _whole(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The whole model under ``vmap``, one row per parameter vector (any model, slower)."""
        names = [n for n, _ in self.group.params]
        shapes = [p.shape for _, p in self.group.params]
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        base.update(dict(self.model.named_buffers()))

        def one(theta_flat: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
            params = dict(base)
            for n, t, s in zip(names, torch.split(theta_flat, [s.numel() for s in shapes]), shapes):
                params[n] = t.view(s)
            return functional_call(self.model, params, (xr.unsqueeze(0),))[0]

        return vmap(one)(theta, x)

    def _rows(self, theta: torch.Tensor, shard: Shard, rows: slice) -> torch.Tensor:
        """The model on the shard's ``rows``, row ``r`` with the group's parameters ``theta[r] (P_g,)``."""
        if not self._whole_model:
            try:
                with self._per_row(theta):
                    return shard.outputs(rows, self.model, self.prefix)
            except _NotBatchFirst:
                self._whole_model = True
        return self._whole(theta, shard.x[shard.rows.pos[rows]])

    def forward(self, shard: Shard) -> Iterator[tuple[slice, NoiseEvaluation]]:
        pos = shard.rows.pos
        base = flatten([p.detach() for _, p in self.group.params])  # (P_g,) once per shard
        with warnings.catch_warnings():
            # vmap falls back to a loop for fused attention kernels; correct, only slower.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for sl in shard.rows.chunks(self.cfg.max_rows):
                noise = shard.noise(sl)
                theta = noise.rows(self.group.sigma, base)
                out = self._rows(theta, shard, sl)
                yield sl, NoiseEvaluation(self.loss_fn(out, shard.y[pos[sl]]), noise)
