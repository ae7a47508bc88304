"""A backprop step: the exact batch gradient by backpropagation, the reference forward-only steps are measured against."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flops_ray.messages import ReplicaState
from flops_ray.models.groups import ResolvedGroup, to_numpy
from flops_ray.models.losses import LossFn
from flops_ray.step.interface import Reduced, StepReport


@torch.no_grad()
def model_input(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    """``x`` as a tensor; floating inputs in the model's dtype (a bfloat16 model takes bfloat16 images)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(next(model.parameters()).dtype) if t.is_floating_point() else t


class BackpropStep:
    """Backpropagates the mean loss through ``model``, clips each group's gradient, and steps ``optimizer``.

    It steps the model's own parameters (the trainer's master copy): with no replicas to copy from or load
    into and nothing running in the background, :meth:`copy_to`, :meth:`load_state`, :meth:`settle`,
    :meth:`discard` and :meth:`close` do nothing.

    Args:
        model: the model, whose ``groups`` parameters train.
        groups: the trained layer groups (each clipped on its own).
        optimizer: the optimizer over the groups' parameters.
        loss_fn: per-sample loss.
        grad_clip: largest L2 norm of a group's gradient (0: no clipping).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[ResolvedGroup],
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        grad_clip: float,
    ):
        self.model = model
        self.groups = groups
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.grad_clip = grad_clip
        self.committing = False
        self._norms: tuple[float, ...] = ()

    def __call__(self, step: int, x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray) -> tuple[Reduced, StepReport]:
        """Leave the gradient of step ``step``'s batch in the parameters' ``grad``; :meth:`apply` steps on it."""
        self.optimizer.zero_grad()
        with torch.enable_grad():
            losses = self.loss_fn(self.model(model_input(self.model, x)), torch.from_numpy(y))
            losses.mean().backward()
        group_params = [[p for _, p in g.params] for g in self.groups]
        # clip_grad_norm_ returns the norm before clipping; an infinite bound leaves the gradient as it is.
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        self._norms = tuple(float(torch.nn.utils.clip_grad_norm_(params, clip)) for params in group_params)
        finite = tuple(all(p.grad is None or bool(p.grad.isfinite().all()) for p in params) for params in group_params)
        return Reduced(finite), StepReport(step, losses.mean().item(), to_numpy(losses))

    def apply(self) -> tuple[float, ...]:
        self.committing = True
        self.optimizer.step()
        self.committing = False
        return self._norms

    def settle(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def copy_to(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        pass

    def load_state(self, state: ReplicaState) -> None:
        pass

    def close(self) -> None:
        pass
