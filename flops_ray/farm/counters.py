"""Cumulative farm activity, shared by the replica pool, the scheduler and the all-reduce."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DispatchCounters:
    """What the farm did so far; the tests use it to prove exactly-once acceptance."""

    dispatched: int = 0
    """Calls submitted, re-dispatches included."""
    completed: int = 0
    """Calls that returned a result."""
    retried: int = 0
    """Tasks queued again because their replica died."""
    accepted: int = 0
    """Results placed in a ``run`` output (each task of each ``run`` exactly once)."""
    recomputed: int = 0
    """All-reduce only: accepted tasks re-run because the replica holding their partial sum died."""
    probes: int = 0
    """Calls that ran one sample of a poison task alone, to find the sample that kills (:mod:`~flops_ray.farm.poison`)."""
    skipped_samples: int = 0
    """Samples found killing the replicas that run them and left out of their step (``farm.skip_poison``)."""
    restarts: int = 0
    """Replicas replaced."""
    state_copies: int = 0
    """Exports of a live replica's parameters and optimizer state for joining replicas (one per version
    serves every replica joining at it)."""
    bytes_sent: int = 0
    """Bytes the driver sent to replicas: batches, task messages, updates (and a resumed run's state)."""
    bytes_returned: int = 0
    """Bytes the driver received from replicas: result payloads, reduction replies."""
