"""What every kind of training step shares: the interface the trainer drives, the reduced gradient and the report.

A step object (:class:`~flops_ray.step.forward.ForwardStep`, :class:`~flops_ray.step.backprop.BackpropStep`)
estimates a batch gradient where its parameters live and then applies it there; the trainer holds a master
copy of the parameters and optimizer for evaluations and checkpoints, which the step object brings up to date.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from flops_ray.messages import ReplicaState


@dataclass(frozen=True)
class Reduced:
    """A step's reduced gradient, as far as the driver sees it."""

    finite: tuple[bool, ...]
    """Per group: whether the gradient estimate is finite (an update with a non-finite one is not applied)."""
    grads: tuple[np.ndarray, ...] | None = None
    """Per group ``(P_g,)`` float64 sums, where the reduction ran in this process (the in-process backend);
    None where they stay with the parameters that step (on the replicas, or in the parameters' ``grad``)."""


@dataclass
class StepReport:
    """What one step measured: the trainer returns it, the metrics log writes it, never needed for the maths."""

    step: int
    loss: float
    """Mean clean loss of the step's batch."""
    losses: np.ndarray | None = None
    """``(B,)`` per-sample clean losses."""
    counts: list[np.ndarray] = field(default_factory=list)
    """Per group ``(B,)`` query counts."""
    traces: list[np.ndarray] = field(default_factory=list)
    """Per group ``(B,)`` trace estimates the allocator read (from ``allocator.signal``)."""
    variance_ratio: list[float] = field(default_factory=list)
    """Per group ``J(A) / J(equal)`` on those traces: below 1 when the allocation is predicted to pay."""
    queries: int = 0
    """Perturbed forward passes run."""
    seconds: float = 0.0
    """Wall time of the whole step (the optimizer update included, once the trainer has applied it)."""
    allocator_seconds: float = 0.0
    """Sampling allocations: on the step's critical path."""
    fit_seconds: float = 0.0
    """The allocator fit this step adopted before its allocation: the previous step's, which ran in a thread
    from that step's main round on (it costs step time only where it outlasts that)."""
    bytes_returned: int = 0
    skipped: int = 0
    """Queries dropped for non-finite losses (``estimator.on_nonfinite = "skip"``)."""
    accuracy: float | None = None
    """Test accuracy after the step, when the step was an evaluation point."""


class TrainStep(Protocol):
    """One kind of training step, as the trainer drives it: estimate (call), then :meth:`apply`."""

    committing: bool
    """True from the moment a step's results start changing state until :meth:`apply` has finished."""

    def __call__(self, step: int, x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray) -> tuple[Reduced, StepReport]:
        """Estimate step ``step``'s gradient on the batch ``x (B, ...)``, ``y (B,)``, ``sample_ids (B,)``."""

    def apply(self) -> None:
        """Apply the last estimated gradient (clip, optimizer step) where the parameters live: the step is done."""

    def settle(self) -> None:
        """Finish the state the step updates in the background, before it is read (a checkpoint)."""

    def discard(self) -> None:
        """Drop the state the step updates in the background: loaded state replaces it."""

    def copy_to(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Copy the parameters and optimizer state that step into ``params`` and ``optimizer``."""

    def load_state(self, state: ReplicaState) -> None:
        """Make ``state`` the parameters and optimizer state that step (a resumed run)."""

    def close(self) -> None:
        """Release what the step runs on."""
