"""The all-reduce: gradient partials kept on the replicas meet in one collective (gloo on CPU, NCCL on GPU).

Partials lost with a dead replica are recomputed first; a collective broken by a death is retried on a
rebuilt process group, for as long as the pool's fault budget lasts. Every member keeps the sum for the
step's update; the driver receives only each group's norm.
"""

from __future__ import annotations

import pickle

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from flops_ray.farm.errors import FarmError
from flops_ray.farm.replica_pool import ReplicaPool, Slot
from flops_ray.farm.scheduler import Scheduler
from flops_ray.messages import ShardTask


class AllReduce:
    """Sums the partials held on ``scheduler.pool``'s replicas.

    Args:
        scheduler: re-runs tasks whose partials were lost.
        collective_timeout: seconds a replica waits in a collective for a peer that may have died.
    """

    def __init__(self, scheduler: Scheduler, collective_timeout: float):
        self.scheduler = scheduler
        self.pool: ReplicaPool = scheduler.pool
        self.collective_timeout = collective_timeout
        self._group: tuple[ActorHandle, ...] = ()
        self.members: list[Slot] = []
        """The replicas of the last successful collective: they hold the sum."""
        self.pool.on_replace.append(self._invalidate)

    def _invalidate(self, index: int, dead: ActorHandle | None) -> None:
        self._group = ()

    def __call__(self) -> list[float]:
        """Sum every replica's kept partials into each member; returns the per-group norms of the sums."""
        counters = self.pool.counters
        while True:
            # A replica dying while partials are recomputed orphans its own: recompute until none is left.
            while self.pool.orphans:
                lost, self.pool.orphans = self.pool.orphans, []
                try:
                    self.scheduler.run(lost, recompute=True)
                except BaseException:
                    self._restore(lost)
                    raise
            members = [s for s in self.pool.slots if s.ready]
            if not members:
                raise FarmError("no replica is up to sum the step's partials")
            refs: list[ray.ObjectRef] = []
            replies = []
            try:
                # A member may be dead already (a kill not yet noticed): opening the group fails like the sum.
                if tuple(s.handle for s in members) != self._group:
                    self._open_group(members)
                refs = [s.handle.allreduce.remote() for s in members]
                for s, ref in zip(members, refs):
                    replies.append(ray.get(ref))
                    if sorted(replies[-1].keys) != sorted(t.key for t in s.held):
                        raise AssertionError("a replica summed different tasks than the driver accepted from it")
            except (RayActorError, RayTaskError) as exc:
                self._recover(members, refs, exc)
                continue
            self.pool.budget.progress()
            counters.bytes_returned += sum(len(pickle.dumps(r)) for r in replies)
            self.members = members
            return list(replies[0].norms)

    def _restore(self, lost: list[ShardTask]) -> None:
        """Orphan again the tasks of ``lost`` whose partials a failed recompute left nowhere: every partial the
        step accepted stays held by a live replica or orphaned, once. (A sum of the step after the failure
        would still stop at the key check if a cancelled call finished on its replica; the next sync clears
        both sides.)"""
        placed = {t.key for s in self.pool.slots for t in s.held} | {t.key for t in self.pool.orphans}
        self.pool.orphans += [t for t in lost if t.key not in placed]

    def _recover(self, members: list[Slot], refs: list[ray.ObjectRef], cause: Exception) -> None:
        """Survivors of a broken collective time out on their own; wait for them and replace the dead.

        A collective that broke with no replica dead is charged to the fault budget itself, so one that
        keeps breaking fails the farm instead of looping.
        """
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
        if not died:
            self.pool.budget.failure("the all-reduce broke", cause)
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
