"""The work on the replicas: each one's calls in flight and gradient partials held, and the orphaned partials."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import ray

from flops_ray.farm.slot import Slot
from flops_ray.messages import ShardTask


class ReplicaWork:
    """What each slot's replica is working on, kept private and changed only through these methods.

    The :class:`~flops_ray.farm.replica_pool.ReplicaPool` owns it: it drops a slot's work when the slot's replica
    dies and the step's partials at each sync. The scheduler tracks its calls and the partials the replicas keep
    through it; the all-reduce takes the orphans to recompute them.

    Args:
        slots: the pool's slots.
    """

    def __init__(self, slots: Iterable[Slot]):
        self._calls: dict[Slot, dict[ray.ObjectRef, int]] = {slot: {} for slot in slots}
        """In-flight ``run`` calls of each slot: reference -> task position."""
        self._held: dict[Slot, list[ShardTask]] = {slot: [] for slot in self._calls}
        """All-reduce: each slot's accepted tasks of this step whose gradient partial lives on its replica."""
        self._orphans: list[ShardTask] = []
        """All-reduce: accepted tasks of this step whose gradient partial died with its replica."""

    def track(self, slot: Slot, ref: ray.ObjectRef, position: int) -> None:
        """Track the slot's call ``ref``, a ``run`` of the task at ``position``."""
        self._calls[slot][ref] = position

    def finish(self, slot: Slot, ref: ray.ObjectRef) -> int:
        """Untrack the slot's call ``ref`` (its result is accepted); returns its task position."""
        return self._calls[slot].pop(ref)

    def in_flight(self, slot: Slot) -> list[int]:
        """Task positions of the slot's calls in flight, in submission order."""
        return list(self._calls[slot].values())

    def calls(self) -> dict[ray.ObjectRef, Slot]:
        """Every call in flight and the slot it runs on, slot by slot in submission order."""
        return {ref: slot for slot, calls in self._calls.items() for ref in calls}

    def forget_calls(self) -> None:
        """Cancel every call in flight and untrack it, so the next run waits only on its own."""
        for calls in self._calls.values():
            for ref in calls:
                ray.cancel(ref)
            calls.clear()

    def hold(self, slot: Slot, task: ShardTask) -> None:
        """All-reduce: the slot's replica keeps ``task``'s accepted gradient partial."""
        self._held[slot].append(task)

    def held(self, slot: Slot) -> tuple[ShardTask, ...]:
        """All-reduce: the accepted tasks of this step whose partial the slot's replica keeps."""
        return tuple(self._held[slot])

    @property
    def orphans(self) -> tuple[ShardTask, ...]:
        """All-reduce: accepted tasks of this step whose partial died with its replica."""
        return tuple(self._orphans)

    def take_orphans(self) -> list[ShardTask]:
        """Hand the orphans over to be recomputed (:meth:`return_orphans` takes back those still lost)."""
        orphans, self._orphans = self._orphans, []
        return orphans

    def return_orphans(self, tasks: Sequence[ShardTask]) -> None:
        """Orphan again those of ``tasks`` that no replica holds and that are not orphaned (their recompute
        failed): every partial the step accepted stays held by a live replica or orphaned, once.

        A sum of the step after the failure would still stop at the all-reduce's key check if a cancelled call
        finished on its replica; the next sync clears both sides.
        """
        placed = {t.key for held in self._held.values() for t in held} | {t.key for t in self._orphans}
        self._orphans += [t for t in tasks if t.key not in placed]

    def drop(self, slot: Slot) -> None:
        """The slot's replica died: its calls are untracked, its partials orphaned."""
        self._orphans += self._held[slot]
        self._calls[slot].clear()
        self._held[slot].clear()

    def new_step(self) -> None:
        """A new step: no partial is held or orphaned."""
        self._orphans.clear()
        for held in self._held.values():
            held.clear()
