"""Completion-order dispatch of shard tasks over replica actors, with affinity and fault recovery.

- Largest-cost task first, at most ``in_flight`` calls per replica; the next task goes to whichever
  replica finishes first (``ray.wait``), so a faster replica takes more shards.
- A ``finalize`` task goes to the replica that ran its ``pilot`` while that replica lives: it is served
  from the pilot cache there instead of recomputing the pilot forwards.
- A replica that dies (any :class:`ray.exceptions.RayActorError`, or a result lost with its node) is replaced by a fresh actor that is
  re-synced before it gets work; its in-flight tasks go back in the queue, and a task that has seen
  ``max_retries`` deaths fails the step.

Results are accepted exactly once: a call's result is only read while the call is still registered,
and a dead replica's calls are unregistered before their tasks are queued again.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from flops_ray.messages import FINALIZE, PILOT, ShardResult, ShardTask
from flops_ray.step import reduce_in_order


class FarmError(RuntimeError):
    """The farm cannot finish a step (a task exhausted its retries, or no replica makes progress)."""


@dataclass
class DispatchCounters:
    """Cumulative dispatcher activity; the tests use it to prove exactly-once acceptance."""

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


@dataclass
class _Slot:
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


class Dispatcher:
    """Runs task lists over ``workers`` replica actors made by ``make_worker(slot)``.

    Args:
        make_worker: creates the actor of a slot (called again to replace a dead one).
        workers: number of replicas.
        in_flight: most calls outstanding per replica.
        max_retries: deaths a task survives before the step fails.
        keep_partials: replicas keep gradient partials for :meth:`allreduce` instead of returning them.
        stall_timeout: seconds without any call finishing before the farm gives up.
        collective_timeout: seconds a replica waits in an all-reduce for a peer that may have died.
    """

    def __init__(
        self,
        make_worker: Callable[[int], ActorHandle],
        workers: int,
        in_flight: int,
        max_retries: int,
        keep_partials: bool = False,
        stall_timeout: float = 600.0,
        collective_timeout: float = 60.0,
    ):
        self.make_worker = make_worker
        self.in_flight = in_flight
        self.max_retries = max_retries
        self.keep_partials = keep_partials
        self.stall_timeout = stall_timeout
        self.collective_timeout = collective_timeout
        self.counters = DispatchCounters()
        self._fault: tuple[int, Callable[[Dispatcher], None]] | None = None
        self.slots = [_Slot(make_worker(i)) for i in range(workers)]
        self._sync: tuple[ray.ObjectRef, ray.ObjectRef, int] | None = None
        self._owner: dict[tuple[int, int], int] = {}
        self._orphans: list[ShardTask] = []
        self._group: tuple[ActorHandle, ...] = ()

    # ---- per step ------------------------------------------------------------------------------------
    def sync(self, batch_ref: ray.ObjectRef, params_ref: ray.ObjectRef, nbytes: int) -> None:
        """Point every replica at the step's batch and parameters (already in the object store).

        Calls on one actor run in submission order, so tasks can be queued behind the sync at once.
        """
        self._sync = (batch_ref, params_ref, nbytes)
        self._owner.clear()
        self._orphans.clear()
        for slot in self.slots:
            slot.held.clear()
            self._send_sync(slot)

    def _send_sync(self, slot: _Slot) -> None:
        batch_ref, params_ref, nbytes = self._sync
        slot.sync_ref = slot.handle.sync.remote(batch_ref, params_ref)
        self.counters.bytes_sent += nbytes

    def run(self, tasks: list[ShardTask], meanwhile: Callable[[], None] | None = None) -> list[ShardResult]:
        """Evaluate ``tasks`` on the replicas; results in task order. ``meanwhile`` runs once, right after
        the first calls are submitted, so driver work (the allocator fit) overlaps the replicas' work."""
        results = self._execute(tasks, meanwhile)
        self.counters.accepted += len(results)
        return results

    def reduce(self, tasks: list[ShardTask], results: list[ShardResult], sizes: list[int]) -> list[np.ndarray]:
        """Per-group gradient sums: in canonical order on the driver, or by an all-reduce among replicas."""
        if not self.keep_partials:
            return reduce_in_order(tasks, results, sizes)
        return self.allreduce()

    # ---- the dispatch loop ---------------------------------------------------------------------------
    def _execute(self, tasks: list[ShardTask], meanwhile: Callable[[], None] | None = None) -> list[ShardResult]:
        try:
            return self._dispatch(tasks, meanwhile)
        except BaseException:
            self._forget()
            raise

    def _forget(self) -> None:
        """Cancel a failed run's calls and unregister them, so the next step waits only on its own."""
        for slot in self.slots:
            for ref in slot.calls:
                ray.cancel(ref)
            slot.calls.clear()
            slot.affine.clear()

    def _dispatch(self, tasks: list[ShardTask], meanwhile: Callable[[], None] | None) -> list[ShardResult]:
        if self._sync is None:
            raise FarmError("sync() must give the replicas a step before tasks run")
        results: list[ShardResult | None] = [None] * len(tasks)
        deaths = [0] * len(tasks)
        general = sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)
        for slot in self.slots:
            slot.affine.clear()
        general = self._place_affine(tasks, general)
        done = 0
        while done < len(tasks):
            self._fill(tasks, general)
            if meanwhile is not None:
                meanwhile, overlapped = None, meanwhile
                overlapped()
            waiting = {ref: slot for slot in self.slots for ref in slot.calls}
            waiting.update({slot.sync_ref: slot for slot in self.slots if slot.sync_ref is not None})
            if not waiting:
                raise FarmError("no replica can take work")
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=self.stall_timeout)
            if not ready:
                raise FarmError(f"no shard finished in {self.stall_timeout:.0f} s")
            ref = ready[0]
            slot = waiting[ref]
            try:
                value = ray.get(ref)
            except (RayActorError, ObjectLostError):
                # A result stored on a node that has just gone is lost with its replica: same recovery.
                general = self._replace(slot, tasks, deaths, general)
                continue
            if ref is slot.sync_ref:
                slot.sync_ref, slot.ready, slot.failures = None, True, 0
                continue
            pos = slot.calls.pop(ref)
            self.counters.completed += 1
            if results[pos] is not None:
                raise AssertionError(f"task {tasks[pos].key} answered twice")
            results[pos] = value
            done += 1
            self.counters.bytes_returned += value.nbytes
            task = tasks[pos]
            if task.kind == PILOT:
                self._owner[(task.group, task.index)] = self.slots.index(slot)
            if self.keep_partials and value.grad is None and task.weights is not None:
                slot.held.append(task)
            self._maybe_inject_fault(done)
        if meanwhile is not None:
            meanwhile()  # an empty task list: the driver's work still happens
        return results

    def _place_affine(self, tasks: list[ShardTask], positions: list[int]) -> list[int]:
        """Move ``finalize`` positions whose pilot owner is up to that owner's queue; return the rest."""
        rest = []
        for i in positions:
            owner = self._owner.get((tasks[i].group, tasks[i].index)) if tasks[i].kind == FINALIZE else None
            if owner is not None:
                self.slots[owner].affine.append(i)
            else:
                rest.append(i)
        return rest

    def _fill(self, tasks: list[ShardTask], general: list[int]) -> None:
        """Top every ready replica up to ``in_flight`` calls: its own finalizes first, then the largest task."""
        for slot in self.slots:
            while slot.ready and len(slot.calls) < self.in_flight and (slot.affine or general):
                pos = slot.affine.pop(0) if slot.affine else general.pop(0)
                ref = slot.handle.run.remote(tasks[pos], self.keep_partials)
                slot.calls[ref] = pos
                self.counters.dispatched += 1
                self.counters.bytes_sent += len(pickle.dumps(tasks[pos]))

    def _replace(self, slot: _Slot, tasks: list[ShardTask], deaths: list[int], general: list[int]) -> list[int]:
        """Requeue a dead replica's work, start its successor and sync it; returns the new general queue."""
        requeue = list(slot.calls.values()) + slot.affine
        for pos in slot.calls.values():
            deaths[pos] += 1
            if deaths[pos] > self.max_retries:
                raise FarmError(
                    f"task {tasks[pos].key} lost its replica {deaths[pos]} times (farm.max_retries={self.max_retries})"
                )
        self.counters.retried += len(slot.calls)
        self._orphans += slot.held
        self._retire(slot)
        general = sorted(general + requeue, key=lambda i: -tasks[i].cost)
        return general

    def _retire(self, slot: _Slot) -> None:
        """Kill the slot's actor (it may only be unreachable) and put a fresh, re-synced one in its place."""
        slot.failures += 1
        if slot.failures > self.max_retries:
            raise FarmError(
                f"a replica died {slot.failures} times in a row before finishing a sync "
                f"(farm.max_retries={self.max_retries})"
            )
        index = self.slots.index(slot)
        self._owner = {k: v for k, v in self._owner.items() if v != index}
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self.make_worker(index)
        slot.ready = False
        slot.calls.clear()
        slot.affine.clear()
        slot.held.clear()
        self.counters.restarts += 1
        self._group = ()
        self._send_sync(slot)

    def inject_fault(self, after: int, action: Callable[[Dispatcher], None] | None = None) -> None:
        """Test hook: once ``after`` results have been accepted in total, run ``action`` (default: kill
        the replica with the most calls in flight), so faults land while shards are in flight."""
        self._fault = (after, action or kill_busiest)

    def busiest(self) -> int:
        """Index of the slot with the most calls in flight."""
        return max(range(len(self.slots)), key=lambda i: len(self.slots[i].calls))

    def _maybe_inject_fault(self, done: int) -> None:
        if self._fault is not None and self.counters.accepted + done >= self._fault[0]:
            action, self._fault = self._fault[1], None
            action(self)

    # ---- all-reduce ----------------------------------------------------------------------------------
    def allreduce(self) -> list[np.ndarray]:
        """Sum the partials kept on the replicas with one collective; rank 0 returns the result.

        Partials lost with a dead replica are recomputed first; a collective broken by a death is retried
        on a rebuilt process group.
        """
        for _ in range(self.max_retries + 1):
            if self._orphans:
                lost, self._orphans = self._orphans, []
                self._execute(lost)
                self.counters.recomputed += len(lost)
            members = [s for s in self.slots if s.ready]
            if tuple(s.handle for s in members) != self._group:
                self._open_group(members)
            refs = [s.handle.allreduce.remote() for s in members]
            replies = []
            try:
                for s, ref in zip(members, refs):
                    replies.append(ray.get(ref))
                    if sorted(replies[-1].keys) != sorted(t.key for t in s.held):
                        raise AssertionError("a replica summed different tasks than the driver accepted from it")
            except (RayActorError, RayTaskError):
                # Survivors of a broken collective time out on their own; wait for them, then start over.
                for s, ref in zip(members, refs):
                    try:
                        ray.get(ref)
                    except RayActorError:
                        self._orphans += s.held
                        self._retire(s)
                    except RayTaskError:
                        pass
                self._group = ()
                continue
            self.counters.bytes_returned += sum(g.nbytes for g in replies[0].grads)
            # Object-store arrays are read-only; callers (the optimizer step) may write to theirs.
            return [np.array(g) for g in replies[0].grads]
        raise FarmError(f"the all-reduce failed {self.max_retries + 1} times")

    def _open_group(self, members: list[_Slot]) -> None:
        address = ray.get(members[0].handle.rendezvous_address.remote())
        ray.get(
            [
                s.handle.open_group.remote(rank, len(members), address, self.collective_timeout)
                for rank, s in enumerate(members)
            ]
        )
        self._group = tuple(s.handle for s in members)

    def close(self) -> None:
        """Kill every replica."""
        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)


def kill_busiest(dispatcher: Dispatcher) -> None:
    """Kill the actor with the most calls in flight (its death surfaces as :class:`RayActorError`)."""
    ray.kill(dispatcher.slots[dispatcher.busiest()].handle, no_restart=True)
