"""The replica pool: one slot per replica position, each holding a live actor that is replaced when it dies.

The pool alone writes its slots, and it owns the work on them (:class:`~flops_ray.farm.replica_work.ReplicaWork`,
which the scheduler and the all-reduce change only through its methods). A replica that joins (a
replacement, or one placed late) adopts the current state first (:mod:`~flops_ray.farm.state_transfer`), then
gets the step's batch; what a death costs is the :class:`~flops_ray.farm.fault_policy.FaultPolicy`'s decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayError

from flops_ray.farm.counters import DispatchCounters
from flops_ray.farm.fault_policy import FaultPolicy
from flops_ray.farm.replica_work import ReplicaWork
from flops_ray.farm.slot import Slot
from flops_ray.farm.state_transfer import StateExport, StateSources
from flops_ray.messages import ReplicaState

Answers = list[tuple[Slot, object]]
"""``(slot, answer)`` pairs, the answer a ``RayError`` for a replica that died, raised or did not answer."""


class ReplicaPool:
    """``replicas`` replica actors made by ``make_replica(slot)``, kept alive and in sync.

    Args:
        make_replica: creates the actor of a slot (called again to replace a dead one).
        replicas: number of replicas.
        faults: what a death costs, the backoff between a slot's replacements and the longest wait.
        counters: where restarts and sync bytes are counted.
    """

    def __init__(
        self, make_replica: Callable[[int], ActorHandle], replicas: int, faults: FaultPolicy, counters: DispatchCounters
    ):
        self.make_replica = make_replica
        self.faults = faults
        self.counters = counters
        self._slots = tuple(Slot(make_replica(i)) for i in range(replicas))
        self._version = 0
        self._states = StateSources(counters)
        self._sync: tuple[ray.ObjectRef, int] | None = None
        self._gen = 0
        self._work = ReplicaWork(self._slots)
        self.on_replace: list[Callable[[int, ActorHandle | None], None]] = []
        """Called with a slot's index and its dead actor's handle (None: none had started) once the slot is
        cleared for a replacement (owners of per-replica state listen)."""

    @property
    def slots(self) -> tuple[Slot, ...]:
        """Every replica position, in order."""
        return self._slots

    @property
    def work(self) -> ReplicaWork:
        """What each replica is working on (the scheduler and the all-reduce change it through its methods)."""
        return self._work

    @property
    def version(self) -> int:
        """Updates the farm has applied: every replica that takes work holds the parameters after these."""
        return self._version

    @property
    def synced(self) -> bool:
        """Whether a step has been given to the replicas."""
        return self._sync is not None

    @property
    def up(self) -> int:
        """Replicas that have come up (answered a sync)."""
        return sum(slot.ready for slot in self._slots)

    def current(self) -> list[Slot]:
        """Up replicas holding the current parameters."""
        return [s for s in self._slots if s.ready and s.version == self._version]

    def sync(self, batch_ref: ray.ObjectRef, nbytes: int) -> None:
        """Point every replica at the step's batch (already in the object store); the last step's partials go.

        Calls on one actor run in submission order, so tasks can be queued behind the sync at once.
        """
        self._sync = (batch_ref, nbytes)
        self._gen += 1
        self._work.new_step()
        for slot in self._slots:
            # A replica not yet up gets the new step when it answers its pending sync: queueing one sync per
            # step behind an unplaced replica would pin every step's batch in the object store.
            if slot.handle is not None and (slot.ready or slot.sync_ref is None):
                self._send_sync(slot)

    def _send_sync(self, slot: Slot) -> None:
        batch_ref, nbytes = self._sync
        self._states.settled(slot)
        if slot.version != self._version:
            self._states.adopt(slot, self._slots, self._version)
            slot.version = self._version
        slot.sync_ref, slot.sync_gen = slot.handle.sync.remote(batch_ref, self._version), self._gen
        self.counters.bytes_sent += nbytes

    def synced_ok(self, slot: Slot) -> None:
        """The slot's replica answered its sync: it may take work once it holds the current step."""
        if slot.sync_gen != self._gen:
            self._send_sync(slot)
            return
        slot.sync_ref, slot.ready, slot.losses = None, True, 0
        self._states.settled(slot)

    def source_lost(self, slot: Slot) -> tuple[bool, Slot | None]:
        """``slot``'s sync failed: was the state it was adopting lost? If so ``slot`` waits for :meth:`resync`.

        Returns:
            ``(lost, dead_peer)``: see :meth:`~flops_ray.farm.state_transfer.StateSources.source_lost`.
        """
        lost, dead_peer = self._states.source_lost(slot)
        if lost:
            slot.version, slot.sync_ref = -1, None
        return lost, dead_peer

    def resync(self, slot: Slot) -> None:
        """Send ``slot`` the step again (after :meth:`source_lost`): it adopts from another source first.

        Raises:
            FarmError: no live replica and no snapshot holds the current parameters.
        """
        if slot.handle is not None and self._sync is not None:
            self._send_sync(slot)

    def applied(self, slots: Sequence[Slot]) -> None:
        """``slots`` applied the step's update: the farm is one version further; the others adopt it later."""
        self._version += 1
        self._states.new_version()
        for slot in slots:
            slot.version = self._version

    def unapply(self) -> None:
        """The only replica that applied the step's update died before its state was saved: the farm is back at
        the previous version (the snapshot's), whose update is applied again."""
        self._version -= 1

    def load_state(self, state: ReplicaState) -> None:
        """Make ``state`` every replica's (a resumed run), kept as the snapshot for replicas joining later."""
        ref = self._states.load(state)
        self._version = state.version
        for slot in self._slots:
            if slot.handle is not None:
                slot.handle.adopt.remote(ref)
                slot.version = state.version
        self.counters.bytes_sent += state.params.nbytes

    def keep_snapshot(self, snapshot: StateExport) -> None:
        """Keep ``snapshot`` (a replica's exported state) for joining replicas that find no live peer."""
        self._states.keep(snapshot)

    def current_snapshot(self) -> ray.ObjectRef | None:
        """The snapshot's state if it holds the current parameters (every replica holding them may be gone)."""
        return self._states.snapshot_at(self._version)

    def replace(self, slot: Slot, what: str, cause: BaseException | str, charge: bool = True) -> None:
        """Kill the slot's actor (it may only be unreachable) and start a fresh one, re-synced, after the
        policy's backoff; its held partials become orphans, its calls are dropped.

        Args:
            slot: the slot whose replica died.
            what: what failed, for the error.
            cause: the exception that reported it.
            charge: count the death against the fault budget (see :meth:`FaultPolicy.charges`).

        Raises:
            FarmError: the death spent the fault budget (the slot is cleared first, so the pool stays usable).
        """
        dying = slot.handle
        self._work.drop(slot)
        if dying is not None:
            self._states.rescue(slot, [s for s in self.current() if s is not slot], self._version)
            ray.kill(dying, no_restart=True)
        self._states.settled(slot)
        slot.handle, slot.ready, slot.sync_ref, slot.version = None, False, None, 0
        slot.losses += 1
        slot.start_at = time.monotonic() + self.faults.backoff(slot.losses)
        self.counters.restarts += 1
        for listener in self.on_replace:
            listener(self._slots.index(slot), dying)
        if charge:
            self.faults.failed(what, cause)
        self.start_due()

    def replace_failed(self, answers: Answers, what: str) -> None:
        """Replace the slots whose answer is an error (``what`` failed)."""
        for slot, answer in answers:
            if isinstance(answer, RayError):
                self.replace(slot, what, answer)

    def start_due(self) -> None:
        """Start the replacements whose backoff is over (and sync them, if a step is under way)."""
        now = time.monotonic()
        for index, slot in enumerate(self._slots):
            if slot.handle is None and slot.start_at <= now:
                slot.handle = self.make_replica(index)
                if self._sync is not None:
                    self._send_sync(slot)

    def next_start(self) -> float | None:
        """Seconds until the next waiting replacement starts (None: none waits)."""
        waits = [slot.start_at for slot in self._slots if slot.handle is None]
        return max(0.0, min(waits) - time.monotonic()) if waits else None

    def busiest(self) -> int:
        """Index of the slot with the most calls in flight."""
        return max(range(len(self._slots)), key=lambda i: len(self._work.in_flight(self._slots[i])))

    def close(self) -> None:
        """Kill every replica."""
        for slot in self._slots:
            if slot.handle is not None:
                ray.kill(slot.handle, no_restart=True)


def ask(slots: Sequence[Slot], call: Callable[[ActorHandle], ray.ObjectRef], timeout: float) -> Answers:
    """``call`` on every slot's actor, waiting up to ``timeout`` seconds for the answers."""
    refs = [call(slot.handle) for slot in slots]
    if refs:  # ``ray.wait`` refuses to wait for nothing
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    answers = []
    for slot, ref in zip(slots, refs):
        try:
            answers.append((slot, ray.get(ref, timeout=0)))
        except RayError as exc:
            answers.append((slot, exc))
    return answers


def answered(answers: Answers) -> list[Slot]:
    """The slots whose answer is not an error."""
    return [slot for slot, answer in answers if not isinstance(answer, RayError)]
