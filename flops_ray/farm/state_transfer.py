"""State transfer: a joining replica adopts the current state from a live peer's export or from the snapshot.

The replicas own the parameters: a replacement (or a replica placed late, when the autoscaler adds a node)
adopts the state of a live peer, replica to replica through the object store, before its first step; the
driver only ever holds object references to that state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.exceptions import ObjectLostError, RayActorError, RayError

from flops_ray.farm.counters import DispatchCounters
from flops_ray.farm.errors import FarmError
from flops_ray.farm.slot import Slot
from flops_ray.messages import ReplicaState

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


class StateSources:
    """The states a joining replica can adopt, and what each joining replica is adopting.

    One live peer's export serves every replica joining at a version; the snapshot (an export kept every
    ``farm.snapshot_every`` updates, or a resumed run's state) serves when no live peer holds the version.

    Args:
        counters: where exports for joining replicas are counted.
    """

    def __init__(self, counters: DispatchCounters):
        self.counters = counters
        self._snapshot: StateExport | None = None
        self._export: tuple[StateExport, Slot] | None = None
        """The current version's export for joining replicas, and the slot of the peer that made it."""
        self._adoptions: dict[Slot, Adoption] = {}
        """What each joining slot's actor adopts before its pending sync."""

    def adopt(self, joining: Slot, slots: Sequence[Slot], version: int) -> None:
        """Have ``joining``'s actor adopt the state after ``version`` updates (before its next call).

        Raises:
            FarmError: no live replica of ``slots`` and no snapshot holds that state.
        """
        source, peer = self._source(joining, slots, version)
        self._adoptions[joining] = Adoption(source, peer, joining.handle.adopt.remote(source.state))

    def settled(self, slot: Slot) -> None:
        """``slot`` adopts nothing any more (its sync answered, or its actor is gone)."""
        self._adoptions.pop(slot, None)

    def _source(self, joining: Slot, slots: Sequence[Slot], version: int) -> tuple[StateExport, Slot | None]:
        """The state for ``joining`` and the peer exporting it: a live peer's (it travels replica to replica),
        else the snapshot if it is current (peer None)."""
        if self._export is not None:
            # One export per version serves every replica joining at it, however many join.
            source, peer = self._export
            if source.version == version and peer is not joining and peer.ready and peer.handle is source.exporter:
                return source, peer
        for peer in slots:
            if peer is not joining and peer.ready and peer.version == version:
                self.counters.state_copies += 1
                self._export = export(peer.handle, version), peer
                return self._export
        if self._snapshot is not None and self._snapshot.version == version:
            return self._snapshot, None
        snapshot = None if self._snapshot is None else self._snapshot.version
        others = [(s.ready, s.version) for s in slots if s is not joining]
        raise FarmError(
            f"no live replica holds the parameters after update {version} (every replica holding them died; "
            f"(up, version) of the others {others}, snapshot at {snapshot}); resume the run from its last checkpoint"
        )

    def source_lost(self, slot: Slot) -> tuple[bool, Slot | None]:
        """``slot``'s sync failed: was the state it was adopting lost (its exporter died or raised before
        exporting, or the state went with its node)? A lost source is forgotten (a lost snapshot is dropped).

        Returns:
            ``(lost, dead_peer)``: ``lost`` False means the replica itself failed; ``dead_peer`` is the peer
            slot still holding an exporter that failed to export (a peer whose export was lost afterwards is
            found out by its own calls).
        """
        adoption = self._adoptions.pop(slot, None)
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
        peer = adoption.peer
        failed = exported is not None and peer is not None and peer.handle is adoption.source.exporter
        return True, peer if failed else None

    def new_version(self) -> None:
        """The farm applied an update: the previous version's export serves no joining replica any more."""
        self._export = None

    def load(self, state: ReplicaState) -> ray.ObjectRef:
        """Keep ``state`` (a resumed run's) as the snapshot: one ``ray.put``, whose reference is returned."""
        ref = ray.put(state)
        self._snapshot = StateExport(state.version, ref, ray.put(state.version), None)
        return ref

    def keep(self, snapshot: StateExport) -> None:
        """Keep ``snapshot`` (a replica's exported state) for joining replicas that find no live peer."""
        self._snapshot = snapshot

    def snapshot_at(self, version: int) -> ray.ObjectRef | None:
        """The snapshot's state if it holds the parameters after ``version`` updates."""
        snap = self._snapshot
        return snap.state if snap is not None and snap.version == version else None

    def rescue(self, dying: Slot, peers: Sequence[Slot], version: int) -> None:
        """``dying``'s actor is going: if it keeps a snapshot it has not exported yet, the first of ``peers``
        (live, holding ``version``) exports instead, or the snapshot would be lost with it."""
        snap = self._snapshot
        if snap is None or snap.exporter is not dying.handle or failure(snap.done, 0) is None:
            return  # not its export, or exported: the state outlives its exporter's process
        self._snapshot = export(peers[0].handle, version) if peers else None
