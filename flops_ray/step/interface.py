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
    """Per group ``(P_g,)`` float64 sums, where the reduction ran in this process (the in-process backend, the
    farm's ``driver`` reduction); None where they stay with the parameters that step (on the replicas, or in the
    parameters' ``grad``)."""
    norms: tuple[float, ...] | None = None
    """Per group L2 norm of the sum, where the replicas reported it instead of the sums (the all-reduce); None
    where ``grads`` holds the sums or nobody measured it."""
    cosines: tuple[float, ...] | None = None
    """Per group, the cosine between the sum and the previous step's, where the replicas reported it (the
    all-reduce: the driver never sees the sums); None where the driver computes it from ``grads``."""


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
    realised_variance_ratio: list[float] = field(default_factory=list)
    """Per group ``J(A) / J(equal)`` on the traces the step's own queries measured (NaN where they measured none):
    what the allocation delivered, beside what the allocator's signal predicted (``variance_ratio``)."""
    snr: list[float] = field(default_factory=list)
    """Per group ``|g|^2 / tr Var(g)``: the estimate's squared norm against the trace of its variance over the
    batch's samples, ``(1/B^2) sum_j T_j / A_j`` (Theorem 1) on the measured traces. Its mean is
    ``1 + |E g|^2 / tr Var(g)``: near 1 the estimate is noise. NaN where either part is unknown."""
    cosine: list[float] = field(default_factory=list)
    """Per group, cosine between this step's estimate and the previous step's (NaN where the driver does not see
    the estimates, or for the first step)."""
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
    skipped_samples: tuple[int, ...] = ()
    """Dataset indices of the batch's samples left out of the step because they kill the replicas that run them
    (``farm.skip_poison``)."""
    grad_norm: list[float] = field(default_factory=list)
    """Per group, the L2 norm of the applied gradient estimate before clipping (set once the step is applied)."""
    clipped: list[bool] = field(default_factory=list)
    """Per group, whether ``grad_clip`` scaled the update down: then the update's size is the clip's, not the
    estimate's."""
    accuracy: float | None = None
    """Test accuracy after the step, when the step was an evaluation point."""

    def applied(self, norms: tuple[float, ...], grad_clip: float) -> None:
        """Record the applied update's per-group norms before clipping at ``grad_clip`` (0: none)."""
        self.grad_norm = list(norms)
        self.clipped = [0 < grad_clip < n for n in norms]


class PoisonSampleError(RuntimeError):
    """A sample of the step's batch kills every replica that runs it, and the farm is to skip such samples: the
    step runs again without it (``farm.skip_poison``)."""

    def __init__(self, sample_id: int, message: str):
        super().__init__(message)
        self.sample_id = sample_id
        """The sample's dataset index."""


class TrainStep(Protocol):
    """One kind of training step, as the trainer drives it: estimate (call), then :meth:`apply`."""

    committing: bool
    """True from the moment a step's results start changing state until :meth:`apply` has finished."""

    def __call__(self, step: int, x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray) -> tuple[Reduced, StepReport]:
        """Estimate step ``step``'s gradient on the batch ``x (B, ...)``, ``y (B,)``, ``sample_ids (B,)``."""

    def apply(self) -> tuple[float, ...]:
        """Apply the last estimated gradient (clip, optimizer step) where the parameters live: the step is done.
        Returns each group's gradient norm before clipping."""

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
