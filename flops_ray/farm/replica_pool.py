"""The replica pool: one slot per replica position, each holding a live actor; a dead actor is replaced.

A replacement is re-synced to the current step before it gets work, so it holds the same parameters
and batch as its peers. A slot whose actors keep dying before finishing a sync fails the farm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle

from flops_ray.farm.counters import DispatchCounters
from flops_ray.farm.errors import FarmError
from flops_ray.messages import ShardTask


@dataclass
class Slot:
    """One replica position; its actor is replaced when it dies."""

    handle: ActorHandle
    ready: bool = False
    """The actor has answered a ``sync``: it exists and holds the current step."""
    sync_ref: ray.ObjectRef | None = None
    failures: int = 0
    """Deaths since the last successful ``sync`` (a replica that never comes up fails the farm)."""
    calls: dict[ray.ObjectRef, int] = field(default_factory=dict)
    """In-flight ``run`` calls: reference -> task position."""
    affine: list[int] = field(default_factory=list)
    """Queued ``finalize`` positions whose pilot this replica ran."""
    held: list[ShardTask] = field(default_factory=list)
    """All-reduce: accepted tasks whose gradient partial lives on this replica."""


class ReplicaPool:
    """``workers`` replica actors made by ``make_worker(slot)``, kept alive and in sync.

    Args:
        make_worker: creates the actor of a slot (called again to replace a dead one).
        workers: number of replicas.
        max_retries: deaths in a row a slot survives before the farm fails.
        counters: where restarts and sync bytes are counted.
    """

    def __init__(
        self,
        make_worker: Callable[[int], ActorHandle],
        workers: int,
        max_retries: int,
        counters: DispatchCounters,
    ):
        self.make_worker = make_worker
        self.max_retries = max_retries
        self.counters = counters
        self.slots = [Slot(make_worker(i)) for i in range(workers)]
        self._sync: tuple[ray.ObjectRef, ray.ObjectRef, int] | None = None
        self.orphans: list[ShardTask] = []
        """All-reduce: accepted tasks of this step whose gradient partial died with its replica."""
        self.on_replace: list[Callable[[int], None]] = []
        """Called with a slot's index when its actor is replaced (owners of per-replica state listen)."""

    def sync(self, batch_ref: ray.ObjectRef, params_ref: ray.ObjectRef, nbytes: int) -> None:
        """Point every replica at the step's batch and parameters (already in the object store).

        Calls on one actor run in submission order, so tasks can be queued behind the sync at once.
        """
        self._sync = (batch_ref, params_ref, nbytes)
        self.orphans.clear()
        for slot in self.slots:
            slot.held.clear()
            self._send_sync(slot)

    @property
    def synced(self) -> bool:
        """Whether a step has been given to the replicas."""
        return self._sync is not None

    def _send_sync(self, slot: Slot) -> None:
        batch_ref, params_ref, nbytes = self._sync
        slot.sync_ref = slot.handle.sync.remote(batch_ref, params_ref)
        self.counters.bytes_sent += nbytes

    def replace(self, slot: Slot) -> None:
        """Kill the slot's actor (it may only be unreachable) and put a fresh, re-synced one in its place."""
        slot.failures += 1
        if slot.failures > self.max_retries:
            raise FarmError(
                f"a replica died {slot.failures} times in a row before finishing a sync "
                f"(farm.max_retries={self.max_retries})"
            )
        index = self.slots.index(slot)
        self.orphans += slot.held
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self.make_worker(index)
        slot.ready = False
        slot.calls.clear()
        slot.affine.clear()
        slot.held.clear()
        self.counters.restarts += 1
        for listener in self.on_replace:
            listener(index)
        self._send_sync(slot)

    def busiest(self) -> int:
        """Index of the slot with the most calls in flight."""
        return max(range(len(self.slots)), key=lambda i: len(self.slots[i].calls))

    def forget_calls(self) -> None:
        """Cancel every call in flight and unregister it, so the next run waits only on its own."""
        for slot in self.slots:
            for ref in slot.calls:
                ray.cancel(ref)
            slot.calls.clear()
            slot.affine.clear()

    def close(self) -> None:
        """Kill every replica."""
        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)
