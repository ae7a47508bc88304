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
    restarts: int = 0
    """Replicas replaced."""
    bytes_sent: int = 0
    """Parameters, batch and task messages sent to replicas."""
    bytes_returned: int = 0
    """Result payloads received from replicas."""
