"""Query allocators: how one group's step budget ``A0`` is split over the ``B`` samples of a batch.

Each allocator maps per-sample features (pilot trace estimates ``T_j``, clean losses, embeddings) to
integer counts that are multiples of the pair size, at least the floor, and sum exactly to ``A0``.
Create one by name with :func:`create_allocator`, the way timm creates models.

>>> import torch
>>> from flops_ray.config.allocator import AllocatorConfig
>>> alloc = create_allocator(AllocatorConfig(kind="neyman"))
>>> feats = AllocationFeatures(traces=torch.tensor([1.0, 1.0, 16.0, 16.0]),
...                            losses=torch.zeros(4), embeddings=torch.eye(4))
>>> alloc.allocate(feats, total=40, minimum=2, unit=2, gen=torch.Generator()).tolist()
[4, 4, 16, 16]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from flops_ray.allocation.budget import to_counts
from flops_ray.allocation.gaussian import GaussianAllocator
from flops_ray.config.allocator import AllocatorConfig
from flops_ray.config.registry import Registry


@dataclass(frozen=True)
class AllocationFeatures:
    """What an allocator may look at for one group and one batch."""

    traces: torch.Tensor
    """``(B,)`` estimates of ``T_j`` from the configured ``allocator.signal`` (clean-pass proxy, trace
    memory or this step's pilot)."""
    losses: torch.Tensor
    """``(B,)`` clean (unperturbed) losses."""
    embeddings: torch.Tensor
    """``(B, D)`` sample embeddings (CLS / pre-logits), for the Gaussian allocator's kernel."""

    def finite_traces(self) -> torch.Tensor:
        """``traces``, or a ValueError naming the samples whose pilot measured no finite trace."""
        bad = (~torch.isfinite(self.traces)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"trace estimates are NaN or inf at batch positions {bad}: trace-based allocators (gaussian, "
                "neyman) reading a pilot need at least two pilot draws per sample (estimator.pilot_queries)"
            )
        return self.traces


class Allocator(Protocol):
    """Splits a budget; stateful allocators (Gaussian) keep their parameters across steps.

    ``needs_traces`` says whether the allocator reads trace estimates at all; ``allocates_from_traces``
    whether ``allocate`` itself does (``update`` may read them to fit state for later steps);
    ``from_config`` builds the allocator from its config section.

    **The unbiasedness rule.** The counts ``A_j`` weight the draws of step ``t`` by ``1 / A_j``, so they may
    depend only on information independent of those draws: the clean pass, earlier steps, or a pilot whose
    draws are then not reused in the estimate. The step enforces it: when ``allocates_from_traces`` and
    the traces come from this step's pilot, the pilot only allocates. Anything fitted in ``update`` on a
    step's traces is used from the next step on (docs/DESIGN.md section 3).

    ``allocate`` is on the step's critical path and only samples; ``update`` fits the state on the same
    features for the next step, on a shallow copy whose ``state_dict`` was loaded with a copy of the
    original's, in a thread beside the step's queries: the next step loads the fitted state into the
    original. So all of an allocator's fitted state must travel through ``state_dict``.
    """

    needs_traces: bool
    allocates_from_traces: bool

    @classmethod
    def from_config(cls, cfg: AllocatorConfig) -> Allocator: ...

    def allocate(
        self, feats: AllocationFeatures, total: int, minimum: int, unit: int, gen: torch.Generator
    ) -> torch.Tensor: ...

    def update(self, feats: AllocationFeatures, total: int, minimum: int, gen: torch.Generator) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class _Stateless:
    needs_traces = False
    allocates_from_traces = False

    @classmethod
    def from_config(cls, cfg: AllocatorConfig) -> Allocator:
        return cls()

    def update(self, feats, total, minimum, gen) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class EqualAllocator(_Stateless):
    """``A_j = A0 / B``: the baseline every method is compared to."""

    def allocate(self, feats, total, minimum, unit, gen):
        return to_counts(torch.ones_like(feats.losses), total, minimum, unit)


class NeymanAllocator(_Stateless):
    """Closed-form optimum of ``J(A)`` (proof of Theorem 2): ``A_j ~ sqrt(T_j)``, water-filled above the floor."""

    needs_traces = True
    allocates_from_traces = True

    def allocate(self, feats, total, minimum, unit, gen):
        return to_counts(feats.finite_traces().clamp_min(0).sqrt(), total, minimum, unit)


def bernoulli_weights(losses: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Relative allocation of the Bernoulli allocator (eq. 6).

    A sample whose clean loss is below the batch mean is cut to ``1/2`` with probability ``p``; the
    pruned half-shares are spread equally over the unpruned samples, so the weights sum to ``B``.
    """
    below = losses < losses.mean()
    pruned = below & (torch.rand(losses.shape, generator=gen, dtype=torch.float64) < p)
    n_pruned, n_kept = int(pruned.sum()), int((~pruned).sum())
    weights = torch.ones(losses.shape, dtype=torch.float64)
    weights[pruned] = 0.5
    weights[~pruned] += 0.5 * n_pruned / n_kept
    return weights


class BernoulliAllocator(_Stateless):
    """Bernoulli allocator (paper eq. 6): prunes easy samples to half their queries with probability ``p``."""

    def __init__(self, p: float):
        self.p = p

    @classmethod
    def from_config(cls, cfg: AllocatorConfig) -> Allocator:
        return cls(cfg.bernoulli_p)

    def allocate(self, feats, total, minimum, unit, gen):
        return to_counts(bernoulli_weights(feats.losses, self.p, gen), total, minimum, unit)


ALLOCATORS: Registry[type[Allocator]] = Registry("allocator.kind")
"""``allocator.kind`` -> allocator class (the :class:`Allocator` protocol)."""


def register_allocator(name: str) -> Callable[[type[Allocator]], type[Allocator]]:
    """Class decorator adding an allocator under ``name`` (timm's registry pattern)."""
    return ALLOCATORS.register(name)


register_allocator("equal")(EqualAllocator)
register_allocator("neyman")(NeymanAllocator)
register_allocator("bernoulli")(BernoulliAllocator)
register_allocator("gaussian")(GaussianAllocator)


def create_allocator(cfg: AllocatorConfig) -> Allocator:
    """Build the allocator ``cfg.kind`` names (``equal``, ``bernoulli``, ``gaussian``, ``neyman``)."""
    return ALLOCATORS[cfg.kind].from_config(cfg)
