"""Layer groups resolved against a model: which modules a query perturbs and which parameters it trains."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flops_ray.config import ConfigError, GroupConfig


@dataclass
class ResolvedGroup:
    """A :class:`GroupConfig` bound to a model's modules and parameters."""

    index: int
    config: GroupConfig
    linears: list[tuple[str, nn.Linear]]
    """LR targets: the group's ``nn.Linear`` modules, in model order."""
    params: list[tuple[str, nn.Parameter]]
    """Trained parameters in the group's flat order (for LR: each linear's weight then bias)."""
    linear_outputs: bool
    """The estimator perturbs the linears' outputs (LR), not the parameters (SPSA/ES)."""

    @property
    def size(self) -> int:
        """``P_g``: trainable coordinates of the group."""
        return sum(p.numel() for _, p in self.params)

    @property
    def noise_width(self) -> float | None:
        """Under LR, the coordinates a query's noise spans per token of a sample: the linears' mean output width. A
        query term's trace is then about this times the group's clean-pass proxy (:mod:`~flops_ray.allocation.
        trace_proxy`; to leading order, where the linears share a width), so proxies times widths compare across
        groups. None under SPSA/ES: there the proxy only bounds the trace, by a factor that differs between
        groups (docs/RESULTS.md, allocation)."""
        if not (self.linear_outputs and self.linears):
            return None
        return sum(lin.out_features for _, lin in self.linears) / len(self.linears)

    @property
    def sigma(self) -> float:
        return self.config.sigma


def _matched_modules(model: nn.Module, cfg: GroupConfig, where: str) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if n]
    matched: dict[str, nn.Module] = {}
    for pattern in cfg.modules:
        hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(n for n, _ in named[:8])
            raise ConfigError(
                f"{where}.modules: pattern {pattern!r} matches no module of the model (names: {sample}, ...)"
            )
        matched.update(hits)
    return [(n, m) for n, m in named if n in matched]


def resolve_groups(model: nn.Module, groups: tuple[GroupConfig, ...], linear_outputs: bool) -> list[ResolvedGroup]:
    """Bind layer groups to ``model``.

    Args:
        model: the model whose modules the patterns name.
        groups: layer groups from the config.
        linear_outputs: the group trains only its ``nn.Linear`` modules' weights and biases (LR perturbs
            their outputs); otherwise every parameter of the matched modules.

    Raises:
        ConfigError: a pattern matches nothing, a group has nothing to train, or two groups share a parameter.
    """
    owner: dict[int, str] = {}
    resolved = []
    for i, cfg in enumerate(groups):
        where = f"groups[{cfg.name}]"
        modules = _matched_modules(model, cfg, where)
        linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
        if linear_outputs:
            params = [(f"{n}.{k}", p) for n, m in linears for k, p in m.named_parameters(recurse=False)]
            if not linears:
                raise ConfigError(f"{where}.modules: LR needs nn.Linear modules; {cfg.modules} match none")
        else:
            seen: dict[int, tuple[str, nn.Parameter]] = {}
            for n, m in modules:
                for k, p in m.named_parameters(prefix=n):
                    seen.setdefault(id(p), (k, p))
            params = list(seen.values())
        if not params:
            raise ConfigError(f"{where}.modules: empty layer group, {cfg.modules} hold no parameters")
        for name, p in params:
            if id(p) in owner:
                raise ConfigError(f"{where}.modules: parameter {name} is already in group {owner[id(p)]!r}")
            owner[id(p)] = cfg.name
        resolved.append(ResolvedGroup(i, cfg, linears, params, linear_outputs))
    return resolved


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (``(P,)``)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a host array; bfloat16, which numpy lacks, as float32."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def unflatten_into(flat: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Copy a flat vector into ``params`` in order (the inverse of :func:`flatten`)."""
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} entries, the parameters {total}")
    offset = 0
    for p in params:
        n = p.numel()
        p.data.copy_(flat[offset : offset + n].view_as(p))
        offset += n
