"""Completion-order scheduling of shard tasks over the replica pool, with retries.

- Longest task first (its forward passes times the seconds per forward its kind and group took so far, each
  replica's slowness divided out: :class:`~flops_ray.farm.task_costs.TaskCosts`), one call per replica in
  turn up to ``in_flight`` each, so a round's longest tasks spread over the replicas; the next task goes to
  whichever replica finishes first (``ray.wait``), so a faster replica takes more shards.
- A replica that dies (any :class:`ray.exceptions.RayActorError`, or a result lost with its node) is
  replaced, after a backoff when deaths come in a row; its in-flight tasks go back in the queue. Deaths
  never fail the step while shards keep finishing (the fault policy's budget; a replica lost while still
  starting is not charged); a stall does: no call finishing for ``stall_timeout`` seconds.
- The tasks a death blames run alone, after the others; one that keeps killing alone has its samples probed
  one by one, each right after a liveness call to its replica, and a probe that kills two replicas that had
  finished a shard, each alive as it started, names the sample (:mod:`flops_ray.farm.poison`).

Results are accepted exactly once: a call's result is only read while the call is still registered,
and a dead replica's calls are unregistered before their tasks are queued again.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable

import ray
from ray.actor import ActorHandle
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from flops_ray.farm.counters import DispatchCounters
from flops_ray.farm.errors import FarmError
from flops_ray.farm.fault_policy import FaultPolicy
from flops_ray.farm.poison import PoisonHunt
from flops_ray.farm.replica_pool import ReplicaPool
from flops_ray.farm.replica_work import ReplicaWork
from flops_ray.farm.slot import Slot
from flops_ray.farm.task_costs import TaskCosts
from flops_ray.messages import ShardResult, ShardTask
from flops_ray.step.interface import PoisonSampleError

ResultListener = Callable[[int], None]
"""Called after each accepted result with the results accepted by earlier runs plus this run's so far (a
recompute run adds to no count, so its numbers continue from the last run's total)."""


class Scheduler:
    """Runs task lists over a :class:`~flops_ray.farm.replica_pool.ReplicaPool`.

    Args:
        pool: the replicas.
        in_flight: most calls outstanding per replica.
        keep_partials: replicas keep gradient partials for the all-reduce instead of returning them.
        coefficients: replicas return per-draw coefficients instead of gradient partials (the scalar protocol).
        poison_deaths: lone deaths of a task in a row before its samples are probed (``farm.poison_deaths``).
        skip_poison: a sample found killing replicas raises :class:`PoisonSampleError` (the step runs again
            without it) instead of :class:`FarmError`.
    """

    def __init__(
        self,
        pool: ReplicaPool,
        in_flight: int,
        keep_partials: bool,
        coefficients: bool = False,
        poison_deaths: int = 3,
        skip_poison: bool = False,
    ):
        self.pool = pool
        self.faults: FaultPolicy = pool.faults
        self.counters: DispatchCounters = pool.counters
        self.work: ReplicaWork = pool.work
        self.in_flight = in_flight
        self.keep_partials = keep_partials
        self.coefficients = coefficients
        self.listeners: list[ResultListener] = []
        self.costs = TaskCosts()
        self.hunt = PoisonHunt(poison_deaths, skip_poison)
        pool.on_replace.append(self._forget)

    def _forget(self, index: int, dead: ActorHandle | None) -> None:
        self.costs.forget(dead)
        self.hunt.forget(dead)

    def run(self, tasks: list[ShardTask], *, recompute: bool = False) -> list[ShardResult]:
        """Evaluate ``tasks`` on the replicas; results in task order.

        Args:
            tasks: the tasks.
            recompute: the tasks were accepted before and are re-run (their partials died): counted as
                ``recomputed``, not ``accepted``.
        """
        try:
            results = self._dispatch(tasks, progress=not recompute)
        except BaseException:
            self.work.forget_calls()
            raise
        if recompute:
            self.counters.recomputed += len(results)
        else:
            self.counters.accepted += len(results)
        return results

    def _dispatch(self, tasks: list[ShardTask], progress: bool) -> list[ShardResult]:
        """Run ``tasks``; ``progress``: their results refill the fault budget (recomputed partials do not, or a
        replica that dies in every all-reduce would loop forever)."""
        if not self.pool.synced:
            raise FarmError("sync() must give the replicas a step before tasks run")
        results: list[ShardResult | None] = [None] * len(tasks)
        tasks = self.hunt.start(tasks)
        general = self._longest_first(tasks, range(len(tasks)))
        done = 0
        last_finish = time.monotonic()
        while done < self.hunt.tasks:
            self.pool.start_due()
            self._fill(tasks, general)
            ref, slot = self._next_finished(last_finish)
            if ref is None:
                continue
            try:
                value = ray.get(ref)
            except (RayActorError, ObjectLostError) as exc:
                # A result stored on a node that has just gone is lost with its replica: same recovery.
                general = self._requeue(slot, tasks, general, exc)
                continue
            except RayTaskError as exc:
                if ref is not slot.sync_ref:
                    raise
                lost, dead_peer = self.pool.source_lost(slot)
                if not lost:
                    general = self._requeue(slot, tasks, general, exc, by_itself=True)
                    continue
                # The state it was adopting died with its exporter: replace that peer, adopt from another.
                if dead_peer is not None:
                    general = self._requeue(dead_peer, tasks, general, exc)
                self.pool.resync(slot)
                continue
            if ref is slot.sync_ref:
                self.pool.synced_ok(slot)
                continue
            last_finish = time.monotonic()
            self.hunt.finished(slot.handle)
            pos = self.work.finish(slot, ref)
            if not self.hunt.own(pos):
                general = self._longest_first(tasks, general + self.hunt.passed(pos))
                continue
            done += 1
            if progress:
                self.faults.progress()
            self._accept(slot, pos, tasks, results, value)
            for listener in self.listeners:
                listener(self.counters.accepted + done)
        return results

    def _next_finished(self, last_finish: float) -> tuple[ray.ObjectRef | None, Slot | None]:
        """The next call (``run`` or ``sync``) to finish, or ``(None, None)`` when a replacement is due first.

        Raises:
            FarmError: no result for ``stall_timeout`` seconds, or no replica exists or waits to start.
        """
        # Syncs first: a failed sync also fails the runs queued behind it, and ``ray.wait`` lists what is ready
        # in this order, so the sync's failure (the replica is re-synced or replaced) is read before theirs.
        waiting = {slot.sync_ref: slot for slot in self.pool.slots if slot.sync_ref is not None}
        waiting.update(self.work.calls())
        starts_in = self.pool.next_start()
        if not waiting and starts_in is None:
            raise FarmError("no replica can take work")
        left = self.faults.time_left(last_finish, self.pool.up, len(self.pool.slots))
        timeout = left if starts_in is None else min(left, starts_in)
        if not waiting:
            time.sleep(timeout)
            return None, None
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
        return (ready[0], waiting[ready[0]]) if ready else (None, None)

    def _accept(self, slot: Slot, pos: int, tasks: list[ShardTask], results: list, value: ShardResult) -> None:
        self.counters.completed += 1
        if results[pos] is not None:
            raise AssertionError(f"task {tasks[pos].key} answered twice")
        results[pos] = value
        self.counters.bytes_returned += value.nbytes
        task = tasks[pos]
        self.costs.learn(task, value.seconds, slot.handle)
        if self.keep_partials and value.grad is None and task.weights is not None:
            self.work.hold(slot, task)

    def _fill(self, tasks: list[ShardTask], general: list[int]) -> None:
        """Top every ready replica up to ``in_flight`` calls, longest task first, one call per replica in turn: a
        pass per depth gives each replica with at most that many calls one more (the fewest-loaded first). A
        suspect or a probe runs alone: only on a replica with no call in flight, and none joins it; a struck
        probe only on a proven replica (an idle one that is not proven runs a proof when nothing else fits)."""
        for depth in range(self.in_flight):
            for slot in self.pool.slots:
                if not general:
                    return
                running = self.work.in_flight(slot)
                if not slot.ready or len(running) > depth or any(self.hunt.alone(p) for p in running):
                    continue
                pick = next((i for i, p in enumerate(general) if self._fits(p, slot, running)), None)
                if pick is not None:
                    pos = general.pop(pick)
                elif running or (pos := self.hunt.proof()) is None:
                    continue
                own = self.hunt.own(pos)  # a probe's result is not the step's: nothing kept, nothing returned
                if not own:
                    self.hunt.sending(pos, slot.handle.describe.remote())
                ref = slot.handle.run.remote(tasks[pos], self.keep_partials and own, self.coefficients and own)
                self.work.track(slot, ref, pos)
                if own:
                    self.counters.dispatched += 1
                else:
                    self.counters.probes += 1
                self.counters.bytes_sent += len(pickle.dumps(tasks[pos]))

    def _fits(self, pos: int, slot: Slot, running: list[int]) -> bool:
        """Whether the task at ``pos`` may join the calls ``running`` on ``slot``."""
        return (not running or not self.hunt.alone(pos)) and self.hunt.fits(pos, slot.handle)

    def _requeue(
        self, slot: Slot, tasks: list[ShardTask], general: list[int], cause: Exception, by_itself: bool = False
    ) -> list[int]:
        """Requeue a dead replica's work and have the pool replace it; returns the new general queue.

        ``by_itself``: the replica failed by itself, not with its node (the fault policy charges such a death
        even while the replica was still starting)."""
        requeue = self.work.in_flight(slot)
        running = [tasks[pos].key for pos in requeue]
        what = f"a replica died running tasks {running}" if running else "a replica failed before finishing a sync"
        self.counters.retried += sum(self.hunt.own(pos) for pos in requeue)
        death = self.hunt.died(slot.handle, requeue)
        try:
            charge = not death.evidence and self.faults.charges(slot, cause, by_itself)
            self.pool.replace(slot, what, cause, charge=charge)
        except FarmError as exc:
            raise self.hunt.explain(exc, requeue) from exc
        try:
            requeue = self.hunt.follow(death, requeue, cause)
        except PoisonSampleError:
            self.counters.skipped_samples += 1
            raise
        return self._longest_first(tasks, general + requeue)

    def _longest_first(self, tasks: list[ShardTask], positions: Iterable[int]) -> list[int]:
        """Longest first, the tasks deaths blamed (and probes) after the others, the most blamed last."""

        return sorted(positions, key=lambda i: (*self.hunt.rank(i), -self.costs.estimate(tasks[i])))
