"""The replica pool: one slot per replica position, each holding a live actor; a dead actor is replaced.

The replicas own the parameters: a replacement (or a replica placed late, when the autoscaler adds a
node) first adopts the state of a live peer, replica to replica, then gets the current step's batch, so
it holds the same parameters and batch as its peers; the driver only ever holds object references to
that state. Deaths are charged to a :class:`~flops_ray.farm.fault_budget.FaultBudget` (too
many with no progress fail the farm); a slot's replacements in a row wait with backoff.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle
from ray.exceptions import ObjectLostError, RayActorError, RayError

from flops_ray.farm.counters import DispatchCounters
from flops_ray.farm.errors import FarmError
from flops_ray.farm.fault_budget import FaultBudget
from flops_ray.messages import ReplicaState, ShardTask

_QUICK_S = 60.0
"""Seconds to wait for a result that is already computed (a hang guard, never expected to elapse)."""
_LOST = (ObjectLostError, RayActorError)
"""What a result or an argument lost with its actor or node raises."""


def failure(ref: ray.ObjectRef, timeout: float) -> RayError | None:
    """The error ``ref`` resolved to (a ``GetTimeoutError`` if it did not within ``timeout`` seconds; None: a
    value), reading it so Ray never reports it as unhandled."""
    try:
        ray.get(ref, timeout=timeout)
    except RayError as exc:
        return exc
    return None


def _lost(exc: RayError | None) -> bool:
    """Whether ``exc`` says an object was lost with its actor or node (an argument's loss included)."""
    return isinstance(exc, _LOST) or isinstance(getattr(exc, "cause", None), _LOST)


@dataclass(frozen=True)
class StateExport:
    """A replica's state put in the object store by the replica itself (the driver holds references only)."""

    version: int
    """Updates applied to the exported parameters."""
    state: ray.ObjectRef
    """The :class:`~flops_ray.messages.ReplicaState`."""
    done: ray.ObjectRef
    """The version again, a few bytes: it resolves (or fails) with the export, so the driver can learn whether
    the export happened without moving the state."""
    exporter: ActorHandle | None
    """The actor that exported it (None: the driver put it, a resumed run)."""


def export(handle: ActorHandle, version: int) -> StateExport:
    """Have the replica ``handle`` (holding ``version``) export its state."""
    state, done = handle.export_state.remote()
    return StateExport(version, state, done, handle)


@dataclass(frozen=True)
class Adoption:
    """A joining replica taking over a state: what it adopts and where from."""

    source: StateExport
    peer: Slot | None
    """The slot of the live peer that exported it (None: the snapshot)."""
    call: ray.ObjectRef
    """The ``adopt`` call (read when the sync behind it fails, so its error is never left unhandled)."""


@dataclass
class Slot:
    """One replica position; its actor is replaced when it dies."""

    handle: ActorHandle | None
    """The live actor; None while a replacement waits out its backoff."""
    ready: bool = False
    """The actor has answered a ``sync``: it is up, and later calls queue behind its next sync."""
    sync_ref: ray.ObjectRef | None = None
    start_at: float = 0.0
    """``time.monotonic()`` at which a waiting replacement starts."""
    losses: int = 0
    """Replicas of this slot lost in a row without one answering a sync (sets the slot's backoff)."""
    sync_gen: int = 0
    """Which of the pool's syncs ``sync_ref`` answers (a replica still starting may answer an old one)."""
    calls: dict[ray.ObjectRef, int] = field(default_factory=dict)
    """In-flight ``run`` calls: reference -> task position."""
    held: list[ShardTask] = field(default_factory=list)
    """All-reduce: accepted tasks whose gradient partial lives on this replica."""
    version: int = 0
    """Updates applied to the parameters its actor holds (a new actor starts from the model: 0)."""
    adoption: Adoption | None = None
    """The state its actor adopts before its pending sync (None: it needs none)."""


class ReplicaPool:
    """``workers`` replica actors made by ``make_worker(slot)``, kept alive and in sync.

    Args:
        make_worker: creates the actor of a slot (called again to replace a dead one).
        workers: number of replicas.
        budget: how many deaths without progress the farm survives, and the backoff between them.
        counters: where restarts and sync bytes are counted.
    """

    def __init__(
        self,
        make_worker: Callable[[int], ActorHandle],
        workers: int,
        budget: FaultBudget,
        counters: DispatchCounters,
    ):
        self.make_worker = make_worker
        self.budget = budget
        self.counters = counters
        self.slots = [Slot(make_worker(i)) for i in range(workers)]
        self.version = 0
        """Updates the farm has applied: every replica that takes work holds the parameters after these."""
        self._snapshot: StateExport | None = None
        self._export: tuple[StateExport, Slot] | None = None
        self._sync: tuple[ray.ObjectRef, int] | None = None
        self._gen = 0
        self.orphans: list[ShardTask] = []
        """All-reduce: accepted tasks of this step whose gradient partial died with its replica."""
        self.on_replace: list[Callable[[int, ActorHandle | None], None]] = []
        """Called with a slot's index and its dead actor's handle (None: none had started) once the slot is
        cleared for a replacement (owners of per-replica state listen)."""

    def sync(self, batch_ref: ray.ObjectRef, nbytes: int) -> None:
        """Point every replica at the step's batch (already in the object store).

        Calls on one actor run in submission order, so tasks can be queued behind the sync at once.
        """
        self._sync = (batch_ref, nbytes)
        self._gen += 1
        self.orphans.clear()
        for slot in self.slots:
            slot.held.clear()
            # A replica not yet up gets the new step when it answers its pending sync: queueing one sync per
            # step behind an unplaced replica would pin every step's batch in the object store.
            if slot.handle is not None and (slot.ready or slot.sync_ref is None):
                self._send_sync(slot)

    @property
    def synced(self) -> bool:
        """Whether a step has been given to the replicas."""
        return self._sync is not None

    @property
    def up(self) -> int:
        """Replicas that have come up (answered a sync)."""
        return sum(slot.ready for slot in self.slots)

    def _send_sync(self, slot: Slot) -> None:
        batch_ref, nbytes = self._sync
        slot.adoption = None
        if slot.version != self.version:
            source, peer = self._state_source(slot)
            slot.adoption = Adoption(source, peer, slot.handle.adopt.remote(source.state))
            slot.version = self.version
        slot.sync_ref, slot.sync_gen = slot.handle.sync.remote(batch_ref, self.version), self._gen
        self.counters.bytes_sent += nbytes

    def _state_source(self, joining: Slot) -> tuple[StateExport, Slot | None]:
        """The current state for ``joining`` and the peer exporting it: a live peer's (it travels replica to
        replica), else the last snapshot if it is current (peer None).

        Raises:
            FarmError: no live replica and no snapshot holds the parameters after ``version`` updates.
        """
        if self._export is not None:
            # One export per version serves every replica joining at it (scaling 1 -> 8 makes one, not seven).
            source, peer = self._export
            if source.version == self.version and peer is not joining and peer.ready and peer.handle is source.exporter:
                return source, peer
        for peer in self.slots:
            if peer is not joining and peer.ready and peer.version == self.version:
                self.counters.state_copies += 1
                self._export = export(peer.handle, self.version), peer
                return self._export
        if self._snapshot is not None and self._snapshot.version == self.version:
            return self._snapshot, None
        snapshot = None if self._snapshot is None else self._snapshot.version
        slots = [(s.ready, s.version) for s in self.slots if s is not joining]
        raise FarmError(
            f"no live replica holds the parameters after update {self.version} (every replica holding them "
            f"died; (up, version) of the others {slots}, snapshot at {snapshot}); resume the run from its last "
            "checkpoint"
        )

    def load_state(self, state: ReplicaState) -> None:
        """Make ``state`` every replica's (a resumed run): one ``ray.put``, kept as the snapshot a replica
        joining with no live peer at this version adopts."""
        ref = ray.put(state)
        self._snapshot = StateExport(state.version, ref, ray.put(state.version), None)
        self.version = state.version
        for slot in self.slots:
            if slot.handle is not None:
                slot.handle.adopt.remote(ref)
                slot.version = state.version
        self.counters.bytes_sent += state.params.nbytes

    def current_snapshot(self) -> ray.ObjectRef | None:
        """The snapshot's state if it holds the current parameters (every replica holding them may be gone)."""
        snap = self._snapshot
        return snap.state if snap is not None and snap.version == self.version else None

    def keep_snapshot(self, snapshot: StateExport) -> None:
        """Keep ``snapshot`` (a replica's exported state) for joiners that find no live peer."""
        self._snapshot = snapshot

    def source_lost(self, slot: Slot) -> tuple[bool, Slot | None]:
        """``slot``'s sync failed: was the state it was adopting lost (its exporter died or raised before
        exporting, or the state went with its node)?

        A lost source is forgotten (a lost snapshot is dropped) and ``slot`` waits for :meth:`resync`.

        Returns:
            ``(lost, dead_peer)``: ``lost`` False means the replica itself failed (the caller replaces it);
            ``dead_peer`` is the peer slot still holding an exporter that failed to export (the caller
            replaces it first; a peer whose export was lost afterwards is found out by its own calls).
        """
        adoption = slot.adoption
        if adoption is None:
            return False, None
        # The sync behind the adopt has failed, so the export and the adopt have both resolved: no wait here.
        exported = failure(adoption.source.done, _QUICK_S)
        adopted = failure(adoption.call, _QUICK_S)
        # An export that failed (its exporter died or raised), or a state lost with its node after exporting.
        if exported is None and not _lost(adopted):
            return False, None
        if self._snapshot is adoption.source:
            self._snapshot = None
        if self._export is not None and self._export[0] is adoption.source:
            self._export = None
        slot.version, slot.adoption, slot.sync_ref = -1, None, None
        peer = adoption.peer
        failed = exported is not None and peer is not None and peer.handle is adoption.source.exporter
        return True, peer if failed else None

    def resync(self, slot: Slot) -> None:
        """Send ``slot`` the step again (after :meth:`source_lost`): it adopts from another source first.

        Raises:
            FarmError: no live replica and no snapshot holds the current parameters.
        """
        if slot.handle is not None and self._sync is not None:
            self._send_sync(slot)

    def applied(self, slots: list[Slot]) -> None:
        """``slots`` applied the step's update: the farm is one version further; the others adopt it later."""
        self.version += 1
        self._export = None  # the previous version's state: no joiner needs it any more
        for slot in slots:
            slot.version = self.version

    def unapply(self) -> None:
        """The only replica that applied the step's update died before its state was saved: the farm is back at
        the previous version (the snapshot's), whose update is applied again."""
        self.version -= 1

    def current(self) -> list[Slot]:
        """Up replicas holding the current parameters."""
        return [s for s in self.slots if s.ready and s.version == self.version]

    def synced_ok(self, slot: Slot) -> None:
        """The slot's replica answered its sync: it may take work once it holds the current step."""
        if slot.sync_gen != self._gen:
            self._send_sync(slot)
            return
        slot.sync_ref, slot.ready, slot.losses, slot.adoption = None, True, 0, None

    def replace(self, slot: Slot, what: str, cause: BaseException | str, charge: bool = True) -> None:
        """Kill the slot's actor (it may only be unreachable) and start a fresh, re-synced one in its place,
        after the budget's backoff.

        Args:
            slot: the slot whose replica died.
            what: what failed, for the error.
            cause: the exception that reported it.
            charge: count the death in the fault budget (False: a replica lost while starting, for a cause
                outside it).

        Raises:
            FarmError: the death exhausted the fault budget (the slot is cleared first, so the pool stays
                usable).
        """
        dying = slot.handle
        self.orphans += slot.held
        if dying is not None:
            self._save_snapshot_from(slot)
            ray.kill(dying, no_restart=True)
        slot.handle, slot.ready, slot.sync_ref, slot.version, slot.adoption = None, False, None, 0, None
        slot.losses += 1
        slot.start_at = time.monotonic() + self.budget.backoff(slot.losses)
        slot.calls.clear()
        slot.held.clear()
        self.counters.restarts += 1
        for listener in self.on_replace:
            listener(self.slots.index(slot), dying)
        if charge:
            self.budget.failure(what, cause)
        self.start_due()

    def _save_snapshot_from(self, dying: Slot) -> None:
        """The snapshot's keeper is dying: if it has not exported yet, have a live peer export instead (the
        snapshot would otherwise be lost with it, and with it the run, should every other replica die too)."""
        snap = self._snapshot
        if snap is None or snap.exporter is not dying.handle or failure(snap.done, 0) is None:
            return  # not its export, or exported: the state outlives its exporter's process
        peers = [s for s in self.current() if s is not dying]
        self._snapshot = export(peers[0].handle, self.version) if peers else None

    def start_due(self) -> None:
        """Start the replacements whose backoff is over (and sync them, if a step is under way)."""
        now = time.monotonic()
        for index, slot in enumerate(self.slots):
            if slot.handle is None and slot.start_at <= now:
                slot.handle = self.make_worker(index)
                if self._sync is not None:
                    self._send_sync(slot)

    def next_start(self) -> float | None:
        """Seconds until the next waiting replacement starts (None: none waits)."""
        waits = [slot.start_at for slot in self.slots if slot.handle is None]
        return max(0.0, min(waits) - time.monotonic()) if waits else None

    def busiest(self) -> int:
        """Index of the slot with the most calls in flight."""
        return max(range(len(self.slots)), key=lambda i: len(self.slots[i].calls))

    def forget_calls(self) -> None:
        """Cancel every call in flight and unregister it, so the next run waits only on its own."""
        for slot in self.slots:
            for ref in slot.calls:
                ray.cancel(ref)
            slot.calls.clear()

    def close(self) -> None:
        """Kill every replica."""
        for slot in self.slots:
            if slot.handle is not None:
                ray.kill(slot.handle, no_restart=True)
