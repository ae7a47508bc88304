"""The all-reduce: gradient partials kept on the replicas meet in one collective (gloo on CPU, NCCL on GPU).

Each task's partial stays apart on the replica that ran it; the members gather them and every member adds
them in task order (:mod:`flops_ray.replica.ordered_sum`), so the sum is the in-process backend's, bit for bit,
whatever replica ran which task, in whatever order, after whatever retries and recomputes.

Partials lost with a dead replica are recomputed first; a collective broken by a death is retried on a
rebuilt process group, for as long as the fault policy allows. Every member keeps the sum for the step's
update, and applies it; the driver receives only each group's norm. The all-reduce recovers from its own
faults, the update's included: if every holder of the sum dies before applying it, the farm is still at
this version, so the lost partials are recomputed and summed again.

The same group serves SPSA/ES's sliced replay (:meth:`AllReduce.replay`): no partials are kept, every member
rebuilds a share of the step's gradient from its coefficients and the shares meet in one all-gather
(:func:`~flops_ray.replica.replay.sliced_replay`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from flops_ray.farm.errors import FarmError
from flops_ray.farm.fault_policy import FaultPolicy
from flops_ray.farm.replica_actor import ReduceReply
from flops_ray.farm.replica_pool import Answers, ReplicaPool, answered
from flops_ray.farm.replica_work import ReplicaWork
from flops_ray.farm.scheduler import Scheduler
from flops_ray.farm.slot import Slot
from flops_ray.farm.update_sender import UpdateSender
from flops_ray.messages import StepUpdate


class AllReduce:
    """Sums the partials held on ``scheduler.pool``'s replicas, and has the members apply the sum.

    Args:
        scheduler: re-runs tasks whose partials were lost.
        sender: sends the summed update to the members.
        collective_timeout: seconds a replica waits in a collective for a peer that may have died.
    """

    def __init__(self, scheduler: Scheduler, sender: UpdateSender, collective_timeout: float):
        self.scheduler = scheduler
        self.sender = sender
        self.pool: ReplicaPool = scheduler.pool
        self.work: ReplicaWork = scheduler.pool.work
        self.faults: FaultPolicy = scheduler.pool.faults
        self.collective_timeout = collective_timeout
        self._group: tuple[ActorHandle, ...] = ()
        self._members: list[Slot] = []
        """The replicas of the last successful collective: they hold the sum."""
        self._again: Callable[[], ReduceReply] = self.__call__
        """The last collective (the sum of kept partials, or a sliced replay), to run again when every holder of its
        result died before applying it."""
        self.pool.on_replace.append(self._invalidate)

    def _invalidate(self, index: int, dead: ActorHandle | None) -> None:
        self._group = ()

    def __call__(self) -> ReduceReply:
        """Sum every replica's kept partials into each member; returns the first member's reply (the per-group
        norms of the sums, and their cosines to the last step's where that member applied it)."""
        self._again = self.__call__

        def sum_partials(members: list[Slot]) -> list[ray.ObjectRef]:
            # Every member adds every partial in task order, whichever member holds it (ordered_sum).
            layout = tuple(tuple(t.key for t in self.work.held(s)) for s in members)
            return [s.handle.allreduce.remote(layout) for s in members]

        while True:
            self._recompute_orphans()
            members, replies = self._collective(sum_partials)
            if members is None:
                continue
            for s, reply in zip(members, replies):
                if sorted(reply.keys) != sorted(t.key for t in self.work.held(s)):
                    raise AssertionError("a replica summed different tasks than the driver accepted from it")
            return replies[0]

    def replay(self, update: StepUpdate) -> ReduceReply:
        """Sliced replay: every member rebuilds its share of the SPSA/ES gradient of ``update`` (``COEFS``) and
        gathers the others' (the shares follow the number of members, the bits do not); returns the first
        member's reply, as :meth:`__call__`. A member lost on the way leaves the survivors to replay again."""
        ref = ray.put(update)
        self._again = lambda: self.replay(update)
        while True:
            members, replies = self._collective(lambda members: [s.handle.replay.remote(ref) for s in members])
            if members is not None:
                return replies[0]

    def _collective(
        self, start: Callable[[list[Slot]], list[ray.ObjectRef]]
    ) -> tuple[list[Slot] | None, list[ReduceReply]]:
        """One collective among the ready replicas, ``start`` asking each member for its part; returns the members
        and their replies, or ``(None, [])`` after a fault it recovered from (the caller tries again)."""
        members = [s for s in self.pool.slots if s.ready]
        if not members:
            raise FarmError("no replica is up to sum the step's gradient")
        refs: list[ray.ObjectRef] = []
        try:
            # A member may be dead already (a kill not yet noticed): opening the group fails like the sum.
            if tuple(s.handle for s in members) != self._group:
                self._open_group(members)
            refs = start(members)
            replies = [ray.get(ref) for ref in refs]
        except (RayActorError, RayTaskError) as exc:
            self._recover(members, refs, exc)
            return None, []
        self.faults.progress()
        self.pool.counters.bytes_returned += sum(len(pickle.dumps(r)) for r in replies)
        self._members = members
        return members, replies

    def apply(self, update: StepUpdate) -> Answers:
        """Have the members of the last collective apply their sum (``update``), summing again after a fault.

        If every member dies before applying it, or the lone member that applied it dies saving the snapshot
        of the result, the farm is still at this version: the replacements adopt the snapshot, and the lost
        partials are recomputed and summed again.

        Returns:
            The members' answers to the update that went through.

        Raises:
            FarmError: every member failed applying it and none died (a replica that raises).
        """
        while True:
            answers, failed = self.sender.send(self._members, update)
            done = answered(answers)
            if done and not failed:
                return answers
            if done:
                # The lone replica died exporting the state it had just applied, the only copy: back one version.
                self.pool.unapply()
                self.pool.replace_failed(answers + failed, "the only replica holding the step's update died saving it")
            else:
                # Every holder of the sum died before applying it (else the policy gives up): still at this version.
                self.faults.unapplied(update.version, answers, summed=True)
                self.pool.replace_failed(answers, "a replica died holding the step's summed gradient")
            # The replacements adopt the snapshot; the lost partials are recomputed and summed again (or replayed).
            self._again()

    def _recompute_orphans(self) -> None:
        """Recompute the partials of dead replicas; a replica dying meanwhile orphans its own, so until none is
        left. A recompute that raises gives back the orphans it had not placed again."""
        while lost := self.work.take_orphans():
            try:
                self.scheduler.run(lost, recompute=True)
            except BaseException:
                self.work.return_orphans(lost)
                raise

    def _recover(self, members: list[Slot], refs: list[ray.ObjectRef], cause: Exception) -> None:
        """Survivors of a broken collective time out on their own; wait for them and replace the dead."""
        if len(refs) < len(members):
            # The group never opened: ask every member something, to learn which of them are gone.
            refs = [s.handle.describe.remote() for s in members]
        died = False
        for s, ref in zip(members, refs):
            try:
                ray.get(ref)
            except RayActorError as exc:
                died = True
                self.pool.replace(s, "a replica died in the all-reduce", exc)
            except RayTaskError:
                pass
        self.faults.collective_broke(cause, died)
        self._group = ()

    def _open_group(self, members: list[Slot]) -> None:
        address = ray.get(members[0].handle.rendezvous_address.remote())
        ray.get(
            [
                s.handle.open_group.remote(rank, len(members), address, self.collective_timeout)
                for rank, s in enumerate(members)
            ]
        )
        self._group = tuple(s.handle for s in members)
