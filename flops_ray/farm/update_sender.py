"""The update sender: replicas apply a step's update, and one of them exports the periodic snapshot."""

from __future__ import annotations

from collections.abc import Sequence

import ray

from flops_ray.farm.replica_pool import Answers, ReplicaPool, answered, ask
from flops_ray.farm.slot import Slot
from flops_ray.farm.state_transfer import export, failure
from flops_ray.messages import StepUpdate


class UpdateSender:
    """Sends each step's update to the replicas of ``pool``, with a snapshot every ``snapshot_every`` updates.

    Args:
        pool: the replicas.
        snapshot_every: updates between snapshots (0: none).
    """

    def __init__(self, pool: ReplicaPool, snapshot_every: int):
        self.pool = pool
        self.snapshot_every = snapshot_every

    def send(self, slots: Sequence[Slot], payload: StepUpdate | ray.ObjectRef) -> tuple[Answers, Answers]:
        """Have ``slots`` apply ``payload`` (the update or its reference): the farm is one version further if
        any of them did, and one of those exports the snapshot when it is due.

        Returns:
            Every slot's answer, and the snapshot keeper's error if its export failed (else nothing).
        """
        answers = ask(slots, lambda h: h.apply.remote(payload), self.pool.faults.stall_timeout)
        done = answered(answers)
        if not done:
            return answers, []
        self.pool.applied(done)
        every = self.snapshot_every
        return answers, self._snapshot(done) if every and self.pool.version % every == 0 else []

    def apply(self, update: StepUpdate) -> Answers:
        """Have every replica holding the current parameters apply ``update`` (one ``ray.put``).

        Returns:
            The answers, and the snapshot keeper's error if its export failed.

        Raises:
            FarmError: every replica failed to apply it.
        """
        answers, failed = self.send(self.pool.current(), ray.put(update))
        if not answered(answers):
            self.pool.faults.unapplied(update.version, answers, summed=False)
        return answers + failed

    def _snapshot(self, slots: list[Slot]) -> Answers:
        """Have one of ``slots`` (in turn) export the current state into the object store; returns the keeper
        if it failed.

        With peers holding the state too the export runs on its own (it delays only the keeper; if the keeper
        dies before exporting, the pool has a peer export instead). A lone replica is the only copy of the
        state, so the driver waits until it is out (it costs nothing: that replica is the whole farm)."""
        keeper = slots[self.pool.version // self.snapshot_every % len(slots)]
        snapshot = export(keeper.handle, self.pool.version)
        error = None if len(slots) > 1 else failure(snapshot.done, self.pool.faults.stall_timeout)
        if error is not None:
            return [(keeper, error)]
        self.pool.keep_snapshot(snapshot)
        return []
