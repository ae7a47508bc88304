"""Typed messages that cross process boundaries between the driver and replicas.

Only seeds, indices and small arrays travel: a replica regenerates every query's noise itself.
Arrays are numpy: Ray ships numpy zero-copy, while torch tensors are pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class TaskKind(str, Enum):
    """What a :class:`ShardTask` asks of a replica (a ``str`` so keys print and sort readably)."""

    CLEAN = "clean"
    """Unperturbed losses and embeddings of the items."""
    PILOT = "pilot"
    """The first queries of each item, run before the allocation reads their trace estimates (never weighted:
    ``allocator.signal = pilot``)."""
    MAIN = "main"
    """The remaining queries, weighted."""

    def __str__(self) -> str:
        return self.value


CLEAN, PILOT, MAIN = TaskKind.CLEAN, TaskKind.PILOT, TaskKind.MAIN


TaskKey = tuple[int, int | None, str, int]
"""``(step, group, kind, index)``: names a task in errors and in the all-reduce's bookkeeping."""


@dataclass(frozen=True)
class ShardItem:
    """One sample's query range ``[q0, q1)`` within a shard."""

    pos: int
    """Row of the sample in the step's batch."""
    sample_id: int
    """Global index of the sample in the dataset (seeds its noise)."""
    q0: int
    q1: int
    baseline: float = 0.0
    """The sample's clean loss, the baseline subtracted from every query's loss."""

    @property
    def cost(self) -> int:
        """Forward passes this item needs."""
        return self.q1 - self.q0


@dataclass(frozen=True)
class ShardTask:
    """A chunk of work for one replica call. ``index`` fixes its place in the canonical reduction."""

    kind: TaskKind
    step: int
    group: int | None
    """Layer group the queries perturb; None for a clean task, which perturbs nothing."""
    index: int
    items: tuple[ShardItem, ...]
    weights: tuple[float, ...] | None = None
    """Per item ``1 / (B * A_j)`` for ``main``; None otherwise."""
    traces: bool = False
    """``main``: also return per-item trace estimates, for the trace memory (a pilot always does)."""

    @property
    def cost(self) -> int:
        """Forward passes the task needs if nothing is cached (a clean item costs one)."""
        if self.kind == CLEAN:
            return len(self.items)
        return sum(it.cost for it in self.items)

    @property
    def key(self) -> TaskKey:
        return (self.step, self.group, self.kind.value, self.index)

    @property
    def order(self) -> tuple[int, int]:
        """Its place in the canonical reduction: by group, then by index."""
        return (self.group, self.index)


@dataclass
class ShardResult:
    """What a replica returns for one :class:`ShardTask`."""

    key: TaskKey
    losses: np.ndarray
    """``(Q,)`` perturbed losses in item order (clean tasks: ``(n_items,)`` clean losses)."""
    grad: np.ndarray | None = None
    """``(P_g,)`` weighted gradient sum (``main``)."""
    coefs: np.ndarray | None = None
    """Scalar protocol (SPSA/ES): ``(D,)`` float32 weighted coefficient of each of the task's noise draws, in
    first-use order, instead of ``grad``: ``grad = sum_d coefs[d] z_d`` (:mod:`flops_ray.replica.replay`)."""
    traces: np.ndarray | None = None
    """``(n_items,)`` trace estimates ``T_j`` from this task's queries (``pilot``, ``main``; NaN for an item
    with fewer than two draws here)."""
    trace_dof: np.ndarray | None = None
    """``(n_items,)`` degrees of freedom behind each trace estimate (independent draws minus one)."""
    embeddings: np.ndarray | None = None
    """``(n_items, D)`` sample embeddings (``clean``)."""
    proxies: np.ndarray | None = None
    """``(n_items, G)`` clean-pass trace proxies per layer group (``clean``; NaN where the model has none)."""
    forwards: int = 0
    """Forward passes run for this result."""
    skipped: int = 0
    """Queries dropped for a non-finite loss (``estimator.on_nonfinite = "skip"``)."""
    seconds: float = 0.0
    """Seconds the replica spent on it (the scheduler learns the order of its tasks from them)."""

    @property
    def nbytes(self) -> int:
        """Bytes of array payload, for the wire-traffic figures."""
        arrays = (self.losses, self.grad, self.coefs, self.traces, self.trace_dof, self.embeddings, self.proxies)
        return sum(a.nbytes for a in arrays if a is not None)


class UpdateSource(str, Enum):
    """Where the replicas find the gradient of a :class:`StepUpdate`."""

    HELD = "held"
    """The all-reduced sum each replica already holds."""
    GRADS = "grads"
    """``StepUpdate.grads``, summed by the driver."""
    COEFS = "coefs"
    """Rebuilt on every replica from the tasks' seeds and ``StepUpdate.coefs`` (the scalar protocol)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class StepUpdate:
    """What every replica needs to apply one step's update to its own copy of the parameters."""

    version: int
    """Updates the replicas applied before this one; a replica at another version refuses it."""
    source: UpdateSource
    grads: tuple[np.ndarray, ...] | None = None
    """``GRADS``: per group ``(P_g,)`` float64 sums."""
    tasks: tuple[ShardTask, ...] = ()
    """``COEFS``: the step's weighted tasks, which name their noise draws."""
    coefs: tuple[np.ndarray, ...] = ()
    """``COEFS``: per task, its ``ShardResult.coefs``."""


@dataclass(frozen=True)
class ReplicaState:
    """A replica's copy of the training state, for a replica that joins (or the driver, at a checkpoint)."""

    version: int
    """Updates applied to it (the run's step count)."""
    params: np.ndarray
    """``(P,)`` trainable parameters, group by group (float32 for a bfloat16 model)."""
    optimizer: dict
    """The optimizer's state dict (tensors on the CPU)."""
