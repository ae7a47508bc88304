"""Typed messages that cross process boundaries between the driver and replicas.

Only seeds, indices and small arrays travel: a replica regenerates every query's noise itself.
Arrays are numpy (Ray ships numpy zero-copy; torch tensors are pickled, several times slower).
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
    """The first queries of each item: trace estimates, per-item sums kept on the replica."""
    FINALIZE = "finalize"
    """A pilot's per-item sums weighted by ``1/(B A_j)`` (served from the replica's pilot cache)."""
    MAIN = "main"
    """The remaining queries, weighted."""

    def __str__(self) -> str:
        return self.value


CLEAN, PILOT, FINALIZE, MAIN = TaskKind.CLEAN, TaskKind.PILOT, TaskKind.FINALIZE, TaskKind.MAIN


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
    """Per item ``1 / (B * A_j)`` for ``finalize`` and ``main``; None otherwise."""
    traces: bool = False
    """``main``: also return per-item trace estimates, for the trace memory (a pilot always does)."""
    keep_sums: bool = False
    """``pilot``: a ``finalize`` task will weight these queries; the replica keeps their per-item sums (within
    ``estimator.pilot_cache_mb``) so that the finalize runs no forward pass."""

    @property
    def cost(self) -> int:
        """Forward passes the task needs if nothing is cached (a clean item costs one)."""
        if self.kind == CLEAN:
            return len(self.items)
        return sum(it.cost for it in self.items)

    @property
    def key(self) -> TaskKey:
        return (self.step, self.group, self.kind.value, self.index)


@dataclass
class ShardResult:
    """What a replica returns for one :class:`ShardTask`."""

    key: TaskKey
    losses: np.ndarray
    """``(Q,)`` perturbed losses in item order (clean tasks: ``(n_items,)`` clean losses)."""
    grad: np.ndarray | None = None
    """``(P_g,)`` weighted gradient sum (``finalize``, ``main``)."""
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
    """Forward passes actually run for this result (0 when served from the pilot cache)."""
    skipped: int = 0
    """Queries dropped for a non-finite loss (``estimator.on_nonfinite = "skip"``)."""

    @property
    def nbytes(self) -> int:
        """Bytes of array payload, for the wire-traffic figures."""
        arrays = (self.losses, self.grad, self.traces, self.trace_dof, self.embeddings, self.proxies)
        return sum(a.nbytes for a in arrays if a is not None)
