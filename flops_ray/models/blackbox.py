"""Black-box objectives: the user's function returns per-sample losses; flops_ray brings allocation and the farm.

A :class:`BlackBox` wraps a batched loss ``fn(thetas (R, D), x (R, ...), y (R,)) -> (R,)``, where row ``r``
of ``thetas`` is the parameter vector to evaluate on row ``r`` of the data. The engine calls it once per
chunk of a shard (``estimator.max_rows`` rows), never once per query, with SPSA or ES perturbations of the
searched vector ``u``: ``theta = theta0 + u``, or ``theta = theta0 + u W`` in a ``d``-dimensional subspace
projected by a fixed random ``W (d, D)`` (paper section 5.2). The box is an ``nn.Module``, so the trainer,
the farm (which ships it to each replica once) and checkpoints treat it like any model.

>>> import torch
>>> box = BlackBox(lambda thetas, x, y: ((x * thetas).sum(-1) - y) ** 2, theta0=torch.zeros(3), subspace=2)
>>> box.losses(torch.zeros(4, 2), torch.ones(4, 3), torch.ones(4)).tolist()
[1.0, 1.0, 1.0, 1.0]
>>> box.theta().shape, box.group(sigma=0.1, queries_per_sample=8).modules
(torch.Size([3]), ('search',))
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from flops_ray.config import GroupConfig

BatchedLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(thetas (R, D), x (R, ...), y (R,)) -> losses (R,)``."""


class BlackBoxError(RuntimeError):
    """The user's loss function raised, or returned something other than ``(R,)`` losses."""


class BlackBoxShapeError(BlackBoxError):
    """The loss function returned a shape other than ``(R,)`` or non-float losses: a bug in the function,
    never skipped."""


class SearchVector(nn.Module):
    """Holds the searched vector ``u (d,)`` as the box's only trainable parameter."""

    def __init__(self, dim: int):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(dim))


class BlackBox(nn.Module):
    """A loss the engine may only query.

    Args:
        fn: batched per-sample loss (see the module docstring). It may be an ``nn.Module``; it then moves
            to the replica's device with the box.
        theta0: ``(D,)`` starting parameters.
        subspace: ``d > 0`` searches ``u (d,)`` with ``theta = theta0 + u W``, ``W`` a fixed ``(d, D)``
            Gaussian matrix scaled by ``1/sqrt(d)``; 0 searches ``theta`` itself.
        seed: seeds ``W``.
        projection: a fixed ``W (d, D)`` to use instead of the Gaussian one (``subspace`` is then its row count),
            e.g. one block per part of ``theta``.
        inference: call ``fn`` under ``torch.inference_mode`` rather than ``torch.no_grad`` (a few percent
            faster): only for a function that records no autograd inside (``torch.enable_grad`` does not
            reach through) and keeps none of the tensors it is given or makes.
    """

    GROUP_MODULE = "search"

    def __init__(
        self,
        fn: BatchedLoss,
        theta0: torch.Tensor,
        subspace: int = 0,
        seed: int = 0,
        inference: bool = False,
        projection: torch.Tensor | None = None,
    ):
        super().__init__()
        # A copy: the caller's tensor (often a live module's weights) keeps changing after the box is made.
        theta0 = torch.as_tensor(theta0, dtype=torch.float32).flatten().clone()
        if projection is not None:
            if projection.shape[1:] != theta0.shape:
                raise ValueError(f"projection: must be (d, {theta0.numel()}), got {tuple(projection.shape)}")
            subspace = len(projection)
        if subspace < 0:
            raise ValueError(f"subspace: must be >= 0, got {subspace}")
        # Registered first: the engine reads the working dtype from the first parameter.
        self.search = SearchVector(subspace or theta0.numel())
        self.fn = fn
        self.inference = inference
        self.register_buffer("theta0", theta0)
        if projection is not None:
            projection = torch.as_tensor(projection, dtype=torch.float32).clone()
        elif subspace:
            gen = torch.Generator().manual_seed(seed)
            projection = torch.randn((subspace, theta0.numel()), generator=gen) / math.sqrt(subspace)
        self.register_buffer("projection", projection)

    @classmethod
    def group(cls, sigma: float, queries_per_sample: int, name: str = "search") -> GroupConfig:
        """The layer group of the searched vector, for ``TrainConfig.groups``."""
        return GroupConfig(name, (cls.GROUP_MODULE,), sigma, queries_per_sample)

    def thetas(self, u: torch.Tensor) -> torch.Tensor:
        """``(R, d) -> (R, D)`` full parameter vectors."""
        return self.theta0 + (u if self.projection is None else u @ self.projection)

    def theta(self) -> torch.Tensor:
        """``(D,)`` the current parameters."""
        return self.thetas(self.search.value.detach()[None])[0]

    def losses(self, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(R,)`` losses of searched vectors ``u (R, d)`` on data rows ``x (R, ...)``, ``y (R,)``.

        Raises:
            BlackBoxError: ``fn`` raised.
            BlackBoxShapeError: ``fn`` returned a shape other than ``(R,)``.
        """
        return self.losses_at(self.thetas(u), x, y)

    def losses_at(self, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(R,)`` losses of full parameter vectors ``thetas (R, D)`` (LR perturbs ``theta`` itself, the output of
        ``u -> theta0 + u W``); errors as :meth:`losses`."""
        try:
            out = self.fn(thetas, x, y)
        except Exception as exc:
            raise BlackBoxError(f"the loss function raised {type(exc).__name__}: {exc}") from exc
        try:
            out = torch.as_tensor(out, device=thetas.device)
        except (TypeError, ValueError, RuntimeError) as exc:  # strings, None, ragged lists: not numbers
            raise BlackBoxShapeError(
                f"the loss function returned {type(out).__name__} {reprlib.repr(out)}, not ({len(thetas)},) "
                f"floating-point losses (torch.as_tensor: {exc})"
            ) from exc
        if out.shape != (len(thetas),):
            raise BlackBoxShapeError(f"the loss function returned shape {tuple(out.shape)}, expected ({len(thetas)},)")
        if not out.is_floating_point():
            # Integer or boolean losses quantise every difference L_q - L_0 the estimate is made of.
            raise BlackBoxShapeError(f"the loss function returned {out.dtype} losses; return floating-point losses")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("a BlackBox returns losses only: call box.losses(u, x, y), or evaluate with box.theta()")


class ModuleLoss(nn.Module):
    """Treat ``module`` as a black box over its flattened parameters: a :data:`BatchedLoss` that runs the
    ``R`` parameter vectors as one vectorised forward (``torch.func.vmap``).

    Being a module itself, it moves to a replica's device with the :class:`BlackBox` that holds it.

    Args:
        module: the model; its parameters, in ``named_parameters`` order, make up ``theta``
            (:meth:`theta0` gives their current values).
        loss_fn: per-sample loss ``(outputs (R, ...), targets (R,)) -> (R,)``.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def theta0(self) -> torch.Tensor:
        """``(D,)`` the module's current parameters, flattened."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    def forward(self, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        named = list(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())

        def one(theta: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
            parts = torch.split(theta, [p.numel() for _, p in named])
            params = {n: t.view(p.shape) for (n, p), t in zip(named, parts)}
            return functional_call(self.module, {**params, **buffers}, (row.unsqueeze(0),))[0]

        return self.loss_fn(vmap(one)(thetas, x), y)
