"""Poison tasks: a task whose samples kill every replica that runs it, told apart from deaths that strike at random.

A replica that dies blames the tasks it was running: each becomes a *suspect*, which from then on runs alone
(no other call on its replica), after the tasks blamed less, so that a death while it runs blames it only.
After ``farm.poison_deaths`` lone deaths of one task in a row (no other task dying alone in between), the
task is split into one *probe* per sample, each run alone and kept out of the step's results. A probe that
kills a *proven* replica (one that had finished a shard before) which was alive as the probe started (it
answered a call sent right before the probe) is a *strike*; ``STRIKES`` strikes name the probe's sample: the
run fails naming its dataset index, or leaves it out (``farm.skip_poison``). A struck probe runs only on a
proven replica; a replica that has not proven itself first re-runs a sample found innocent (a *proof*).
Probes that all run through clear the task, which runs again whole.

A killer from outside (a preempted node, a kill storm) strikes whatever runs: its deaths spread over the
tasks, and one that strikes every replica at its first shard never kills a proven one; one that lands after
a probe is done is found by the next probe's liveness call (the replica was dead before that probe started),
and a death from outside while a probe runs is one strike, not a verdict. Such storms are survived while the
fault budget lasts and never name a sample; a poison sample kills every replica it lands on, proven or not.
The scheduler carries this out (:mod:`flops_ray.farm.scheduler`).

>>> watch = PoisonWatch(deaths=2)
>>> a, b = (0, 0, "main", 0), (0, 0, "main", 1)
>>> watch.died([a, b]), watch.suspect(a), watch.died([a]), watch.died([b]), watch.died([a]), watch.died([a])
(False, True, False, False, False, True)
>>> watch.cleared(a); watch.died([a]), watch.blamed(a)
(False, 5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayError

from flops_ray.farm.errors import FarmError
from flops_ray.messages import ShardTask, TaskKey
from flops_ray.step.interface import PoisonSampleError

STRIKES = 2
"""Proven replicas, each alive as the probe started, that a probe must kill before its sample is named: a death
from outside can land while a probe runs; a poison sample kills every replica it lands on."""
LIVENESS_TIMEOUT_S = 30.0
"""How long a dead replica's liveness call may take to resolve (it answered, or failed with its replica)."""


class PoisonWatch:
    """Which of a run's tasks were running when replicas died, and which of them kill alone, again and again.

    Args:
        deaths: lone deaths of one task in a row before its samples are probed (``farm.poison_deaths``).
    """

    def __init__(self, deaths: int):
        self.deaths = deaths
        self._blamed: dict[TaskKey, int] = {}
        self._lone: tuple[TaskKey | None, int] = (None, 0)
        """The task whose replicas died alone last, and how many in a row."""

    def new_run(self) -> None:
        """A new list of tasks: nothing is suspect."""
        self._blamed.clear()
        self._lone = (None, 0)

    def suspect(self, key: TaskKey) -> bool:
        """Whether ``key`` was running when a replica died (it then runs alone)."""
        return key in self._blamed

    def blamed(self, key: TaskKey) -> int:
        """Deaths ``key`` was running in."""
        return self._blamed.get(key, 0)

    def died(self, keys: Sequence[TaskKey]) -> bool:
        """A replica died running the tasks ``keys``; returns whether its samples are to be probed (it was the
        one task running, for the ``deaths``-th time in a row)."""
        for key in keys:
            self._blamed[key] = self.blamed(key) + 1
        if len(keys) != 1:
            return False
        last, count = self._lone
        self._lone = (keys[0], count + 1 if keys[0] == last else 1)
        return self._lone[1] >= self.deaths

    def cleared(self, key: TaskKey) -> None:
        """Every probe of ``key`` ran through: its streak starts again (it stays a suspect)."""
        if self._lone[0] == key:
            self._lone = (None, 0)


@dataclass(frozen=True)
class Death:
    """What one replica death means for the hunt."""

    proven: bool
    """The replica had finished a shard before."""
    probe: int | None
    """The position of the probe it was running (probes run alone), if any."""
    probing: bool
    """Its one task reached the lone-death streak: its samples are to be probed."""
    started: bool
    """The replica answered the liveness call sent right before its probe: it was alive as the probe started."""

    @property
    def evidence(self) -> bool:
        """A probe killed a proven replica that was alive as the probe started: a strike against the sample,
        which costs no fault budget."""
        return self.probe is not None and self.proven and self.started


class PoisonHunt:
    """One scheduler's hunt for poison: the run's tasks and its probes by position, which run alone, the proven
    replicas, and the verdicts.

    Args:
        deaths: lone deaths of a task in a row before its samples are probed (``farm.poison_deaths``).
        skip: a sample found raises :class:`PoisonSampleError` (its step runs again without it) rather than
            :class:`FarmError` (``farm.skip_poison``).
    """

    def __init__(self, deaths: int, skip: bool):
        self.watch = PoisonWatch(deaths)
        self.skip = skip
        self.run: list[ShardTask] = []
        """The run's tasks, then the probes of a suspect's samples (positions from :attr:`tasks` on)."""
        self.tasks = 0
        """How many of :attr:`run` are the run's own tasks."""
        self._probed: tuple[int, set[int]] | None = None
        """The probed task's position, and its probes' positions still to run through."""
        self._deaths: dict[int, int] = {}
        """Deaths each position was running in (probes share their task's key)."""
        self._proven: set[ActorHandle] = set()
        """Replicas that have finished a shard: a probe that kills one of them strikes its sample."""
        self._liveness: dict[int, ray.ObjectRef] = {}
        """Per probe in flight, the liveness call sent right before it to its replica."""
        self._strikes: dict[int, int] = {}
        """Strikes against each probe's sample (:attr:`Death.evidence`)."""
        self._innocent: list[int] = []
        """Probes that ran through, whose samples a replica re-runs to prove itself."""

    def start(self, tasks: list[ShardTask]) -> list[ShardTask]:
        """A new run of ``tasks``: nothing is suspect; returns :attr:`run`, which probes may extend."""
        self.run, self.tasks, self._probed, self._deaths = list(tasks), len(tasks), None, {}
        self._liveness, self._strikes, self._innocent = {}, {}, []
        self.watch.new_run()
        return self.run

    def own(self, pos: int) -> bool:
        """Whether ``pos`` is one of the run's tasks (else a probe, whose result is not the step's)."""
        return pos < self.tasks

    def alone(self, pos: int) -> bool:
        """Whether the task at ``pos`` runs alone: a probe, or a task some death blamed."""
        return not self.own(pos) or self.watch.suspect(self.run[pos].key)

    def rank(self, pos: int) -> tuple[bool, int]:
        """Where ``pos`` goes in the queue before its cost: those running alone last, the most blamed last."""
        return self.alone(pos), self._deaths.get(pos, 0)

    def sending(self, pos: int, liveness: ray.ObjectRef) -> None:
        """The probe at ``pos`` is sent to a replica right after the call ``liveness`` (any cheap call): the
        replica answers it only if it is alive as the probe starts (an actor runs its calls in order)."""
        self._liveness[pos] = liveness

    def fits(self, pos: int, handle: ActorHandle) -> bool:
        """Whether the task at ``pos`` may run on ``handle``: a struck probe needs a proven replica."""
        return pos not in self._strikes or handle in self._proven

    def proof(self) -> int | None:
        """A new probe, of a sample found innocent, for a replica to prove itself on; its position (in no
        task's probes, so its result clears nothing), or None while no sample was found innocent."""
        if not self._innocent:
            return None
        self.run.append(self.run[self._innocent[0]])
        return len(self.run) - 1

    def finished(self, handle: ActorHandle) -> None:
        """The replica ``handle`` finished a shard: it is proven."""
        self._proven.add(handle)

    def forget(self, handle: ActorHandle | None) -> None:
        """The replica ``handle`` is gone."""
        self._proven.discard(handle)

    def died(self, handle: ActorHandle, positions: Sequence[int]) -> Death:
        """The replica ``handle`` died running the tasks at ``positions``."""
        for pos in positions:
            self._deaths[pos] = self._deaths.get(pos, 0) + 1
        probe = next((pos for pos in positions if not self.own(pos)), None)
        keys = [self.run[pos].key for pos in positions]
        probing = probe is None and bool(keys) and self.watch.died(keys) and self._probed is None
        return Death(handle in self._proven, probe, probing, probe is not None and self._started(probe))

    def _started(self, pos: int) -> bool:
        """Whether the replica that died running the probe at ``pos`` answered the liveness call sent before it."""
        liveness = self._liveness.pop(pos, None)
        if liveness is None:
            return False
        try:
            ray.get(liveness, timeout=LIVENESS_TIMEOUT_S)
        except RayError:  # it failed with its replica, or never resolved: the replica died before the probe
            return False
        return True

    def follow(self, death: Death, positions: list[int], cause: BaseException) -> list[int]:
        """Act on ``death`` (the replica is replaced): returns the positions to queue again.

        Raises:
            FarmError: a probe's ``STRIKES``-th strike: naming the sample (dataset index), its batch row, the task.
            PoisonSampleError: the same, with ``skip``.
        """
        if death.evidence:
            self._strikes[death.probe] = self._strikes.get(death.probe, 0) + 1
            if self._strikes[death.probe] >= STRIKES:
                raise self._verdict(death.probe, cause)
            return positions
        if not death.probing:
            return positions
        (pos,) = positions
        start = len(self.run)
        self.run += probes(self.run[pos])
        self._probed = (pos, set(range(start, len(self.run))))
        return list(range(start, len(self.run)))

    def passed(self, pos: int) -> list[int]:
        """The probe at ``pos`` ran through: its sample is innocent. Returns the positions to queue again: the
        probed task, whole, once every probe has (the deaths came from outside, or its samples kill only
        together, which the fault budget ends)."""
        self._liveness.pop(pos, None)
        if self._probed is None or pos not in self._probed[1]:
            return []
        self._innocent.append(pos)
        self._probed[1].discard(pos)
        if self._probed[1]:
            return []
        task, self._probed = self._probed[0], None
        self.watch.cleared(self.run[task].key)
        return [task]

    def explain(self, spent: FarmError, positions: Sequence[int]) -> FarmError:
        """The fault budget ran out (``spent``): the error, naming the samples of a task killing alone."""
        if self._probed is not None:
            return FarmError(f"{spent}; the samples of {describe(self.run[self._probed[0]])} were being probed")
        if len(positions) == 1 and self.own(positions[0]):
            return FarmError(f"{spent}; the last replica died running {describe(self.run[positions[0]])} alone")
        return spent

    def _verdict(self, pos: int, cause: BaseException) -> Exception:
        probe, parent = self.run[pos], self.run[self._probed[0]]
        item = probe.items[0]
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        message = (
            f"dataset sample {item.sample_id} (batch row {item.pos} of step {probe.step}) kills the replicas that "
            f"run it: {describe(parent)} was running in {self.watch.blamed(parent.key)} replica deaths, the last "
            f"ones alone, then the sample alone killed {STRIKES} replicas that had finished shards; the last death: "
            f"{reason}"
        )
        if self.skip:
            return PoisonSampleError(item.sample_id, message)
        return FarmError(f"{message} (farm.skip_poison=true leaves such samples out)")


def probes(task: ShardTask) -> list[ShardTask]:
    """One task per sample of ``task``: its items of that sample (a sample's queries may be split in two items)."""
    ids = list(dict.fromkeys(it.sample_id for it in task.items))
    out = []
    for sid in ids:
        keep = [i for i, it in enumerate(task.items) if it.sample_id == sid]
        weights = None if task.weights is None else tuple(task.weights[i] for i in keep)
        out.append(dataclasses.replace(task, items=tuple(task.items[i] for i in keep), weights=weights))
    return out


def describe(task: ShardTask) -> str:
    """The task and its samples, for an error: ``task (0, 1, 'main', 3) (samples 12, 57 at batch rows 0, 4)``."""
    ids = ", ".join(str(s) for s in dict.fromkeys(it.sample_id for it in task.items))
    rows = ", ".join(str(p) for p in dict.fromkeys(it.pos for it in task.items))
    return f"task {task.key} (dataset samples {ids} at batch rows {rows})"
