"""Parameter perturbation (SPSA, ES): query ``q`` evaluates ``theta + sigma * eps_q``; ``D_q = eps_q``.

SPSA uses antithetic pairs ``(+eps, -eps)``, whose two terms average to ``(L+ - L-)/(2 sigma) * eps``;
ES is one-sided with the clean-loss baseline.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from flops_ray.estimators.base import Draws, Estimator, Shard
from flops_ray.estimators.noise_layout import NoiseLayout
from flops_ray.estimators.registry import register_estimator
from flops_ray.models.groups import ResolvedGroup, flatten


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

    @property
    def weight(self) -> torch.Tensor:
        """The stood-in module's weight (a caller such as peft's LoRA layer reads its dtype and device)."""
        return self.inner.weight

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


class _LowRank(nn.Module):
    """Stands in for an ``nn.Linear`` of the group under rank-1 noise while a chunk runs: row ``r``'s weight is
    ``W + a_r u_r v_r^T`` and its bias ``b + a_r z_r`` (``a_r = sigma sign_r``), so the row's output is the plain
    ``x W^T + b`` plus ``a_r ((x v_r) u_r^T + z_r)``: no per-row weights are formed (``O(m + n)`` per token
    instead of ``O(mn)``)."""

    def __init__(self, inner: nn.Linear, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.inner = inner
        self.u, self.v, self.bias = u, v, bias
        """``(r, m)`` ``a_r u_r``, ``(r, n)`` ``v_r`` and ``(r, m)`` ``a_r z_r`` (None: the bias is not perturbed)."""

    @property
    def weight(self) -> torch.Tensor:
        """The stood-in module's weight (a caller such as peft's LoRA layer reads its dtype and device)."""
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.u.shape[0]
        if x.dim() < 2 or x.shape[0] != rows:
            raise _NotBatchFirst
        out = nn.functional.linear(x, self.inner.weight, self.inner.bias)  # (r, ..., m)
        tokens = x.reshape(rows, -1, x.shape[-1])  # (r, T, n)
        delta = torch.bmm(tokens, self.v[:, :, None]) * self.u[:, None, :]  # (r, T, m)
        if self.bias is not None:
            delta += self.bias[:, None, :]
        return out + delta.view(out.shape)


def _stream_blocks(group: ResolvedGroup, layout: NoiseLayout) -> dict[str, tuple[int, int, int]] | None:
    """Parameter name -> ``(start, m, n)`` of its block in a draw's stream, when the layout has a block per
    parameter and some are rank-1 (None: dense noise, which the per-row path reads from the formed draws)."""
    if len(layout.blocks) != len(group.params) or not any(n for _, n in layout.blocks):
        return None
    return {name: (src, m, n) for (name, _), src, (m, n) in zip(group.params, layout.sources, layout.blocks)}


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
    is not batch-first). Under rank-1 noise a group of whole linears forms no per-row parameters: each
    linear adds its rows' factored perturbation to its plain output (:class:`_LowRank`)."""

    paired_kinds = ("spsa",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owners = _owners(self.group)
        names = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        # A parameter shared by several modules must be perturbed in all of them: only the whole model does.
        tied = any(names[id(p)] > 1 for _, p in self.group.params)
        self._whole_model = "" in self._owners or tied
        self._blocks = None if self._whole_model else _stream_blocks(self.group, self.noise_layout(None))
        """Rank-1 noise: where each parameter's normals sit in a draw's stream, read without forming the draws."""

    def noise_size(self, x: torch.Tensor) -> int:
        return self.group.size

    def noise_layout(self, x: torch.Tensor) -> NoiseLayout:
        """``estimator.noise``: dense normals, or rank-1 blocks for the group's matrices."""
        return NoiseLayout.of([p.shape for _, p in self.group.params], self.cfg.noise == "rank1")

    @contextlib.contextmanager
    def _swapped(self, stand_in: Callable[[str, nn.Module], nn.Module]) -> Iterator[None]:
        """Replace each owning module ``o`` by ``stand_in(o, module)`` while the context runs."""
        originals = {o: self.model.get_submodule(o) for o in self._owners}
        try:
            for o, module in originals.items():
                parent, _, child = o.rpartition(".")
                setattr(self.model.get_submodule(parent), child, stand_in(o, module))
            yield
        finally:
            for o, module in originals.items():
                parent, _, child = o.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module)

    def _per_row(self, theta: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """Swap each owning module for a :class:`_PerRow` of it with ``theta (r, P_g)``'s slices."""

        def stand_in(o: str, module: nn.Module) -> nn.Module:
            params = self._owners[o]
            return _PerRow(module, {n: theta[:, off : off + s.numel()].view(-1, *s) for n, off, s in params})

        return self._swapped(stand_in)

    def _factored(self, noise: Draws) -> contextlib.AbstractContextManager[None]:
        """Swap each owning ``nn.Linear`` whose weight has rank-1 noise for a :class:`_LowRank` of it, and any
        other owner for a :class:`_PerRow` with only its own parameters' rows, all read from the draws' streams."""
        scale = (self.group.sigma * noise.sign).to(noise.dtype)[:, None]  # (r, 1)
        streams = noise.streams.to(noise.dtype)[noise.draw]  # (r, normals)

        def factors(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            src, m, n = self._blocks[name]
            return streams[:, src : src + m], streams[:, src + m : src + m + n] if n else None

        def rows(name: str, shape: torch.Size) -> torch.Tensor:  # (r, *shape) sigma sign_r z_r
            u, v = factors(name)
            z = u if v is None else u[:, :, None] * v[:, None, :]
            return scale.view(-1, *([1] * len(shape))) * z.reshape(-1, *shape)

        def stand_in(o: str, module: nn.Module) -> nn.Module:
            names = {local for local, _, _ in self._owners[o]}
            # A subclass with its own forward may do more than ``x W^T + b``: it gets per-row weights.
            if type(module).forward is nn.Linear.forward and "weight" in names and names <= {"weight", "bias"}:
                u, v = factors(f"{o}.weight")
                if v is not None:
                    bias = rows(f"{o}.bias", module.bias.shape) if "bias" in names else None
                    return _LowRank(module, scale * u, v, bias)
            params = {
                local: module.get_parameter(local).detach() + rows(f"{o}.{local}", shape)
                for local, _, shape in self._owners[o]
            }
            return _PerRow(module, params)

        return self._swapped(stand_in)

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
        base = None  # (P_g,) once per shard, and only for the per-row path: a copy of the group's parameters
        with warnings.catch_warnings():
            # vmap falls back to a loop for fused attention kernels; correct, only slower.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for sl in shard.rows.chunks(self.cfg.max_rows):
                noise = shard.noise(sl)
                out = self._factored_rows(noise, shard, sl) if self._blocks else None
                if out is None:
                    if base is None:
                        base = flatten([p.detach() for _, p in self.group.params])
                    out = self._rows(noise.rows(self.group.sigma, base), shard, sl)
                yield sl, NoiseEvaluation(self.loss_fn(out, shard.y[pos[sl]]), noise)

    def _factored_rows(self, noise: Draws, shard: Shard, rows: slice) -> torch.Tensor | None:
        """The model on ``rows`` with rank-1 noise read from the streams; None (for good) when an owner's input is
        not batch-first."""
        try:
            with self._factored(noise):
                return shard.outputs(rows, self.model, self.prefix)
        except _NotBatchFirst:
            self._blocks = None
            return None
