"""The fault policy: what the farm does when a replica dies, fails or is late (replace, retry or give up).

The pool, the scheduler and the all-reduce carry the decisions out; the policy makes them, against a
:class:`~flops_ray.farm.fault_budget.FaultBudget`:

- A replica that dies, raises or does not answer is replaced, after a backoff when one slot's replicas die
  in a row; the tasks of its calls in flight run again elsewhere.
- Its death is charged to the budget, unless it was lost while starting for a cause outside it (a
  preempted node says nothing about the work); too many charges with no progress fail the farm.
- No call finishing for ``stall_timeout`` seconds fails the farm.
- A collective broken by a death is retried on a rebuilt group; one broken with no replica dead is charged.
- An update no replica applied fails the farm, unless every holder of the all-reduced sum died: the farm
  is still at that version, so the partials are summed again and the update retried.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ray.exceptions import RayActorError

from flops_ray.farm.errors import FarmError
from flops_ray.farm.fault_budget import FaultBudget
from flops_ray.farm.slot import Slot


class FaultPolicy:
    """Fault decisions under ``budget``, with ``stall_timeout`` as the limit on waiting.

    Args:
        budget: failures in a row the farm survives, and the backoff between a slot's replacements.
        stall_timeout: seconds without any call finishing (or a replica answering) before the farm gives up.
    """

    def __init__(self, budget: FaultBudget, stall_timeout: float):
        self.budget = budget
        self.stall_timeout = stall_timeout

    def progress(self) -> None:
        """The farm finished something (a result accepted, a collective, an update): the budget is full again."""
        self.budget.progress()

    def backoff(self, losses: int) -> float:
        """Seconds before a slot's replacement, after ``losses`` losses of that slot in a row."""
        return self.budget.backoff(losses)

    def charges(self, slot: Slot, cause: BaseException, by_itself: bool = False) -> bool:
        """Whether the death of ``slot``'s replica counts against the budget: it does unless the replica was
        lost while starting, neither by itself (``by_itself``: its sync raised) nor by its own constructor."""
        return by_itself or slot.ready or getattr(cause, "actor_init_failed", False)

    def failed(self, what: str, cause: BaseException | str) -> None:
        """Charge one failure (``what`` failed, reported by ``cause``).

        Raises:
            FarmError: the budget is spent: more failures in a row than it allows, with no progress between.
        """
        self.budget.failure(what, cause)

    def time_left(self, last_finish: float, up: int, slots: int) -> float:
        """Seconds left to wait for a call to finish, the last one having finished at ``last_finish``
        (``time.monotonic()``).

        Raises:
            FarmError: none left (``up`` of ``slots`` replicas are up, for the error).
        """
        left = self.stall_timeout - (time.monotonic() - last_finish)
        if left <= 0:
            raise FarmError(
                f"no shard finished in {self.stall_timeout:.0f} s (farm.stall_timeout_s; {up} of {slots} replicas up)"
            )
        return left

    def collective_broke(self, cause: BaseException, died: bool) -> None:
        """A collective broke; ``died``: a member died in it (and was charged when it was replaced).

        Raises:
            FarmError: it broke with no member dead and the charge for that spent the budget.
        """
        if not died:
            self.failed("the all-reduce broke", cause)

    def unapplied(self, version: int, answers: Sequence[tuple[Slot, object]], summed: bool) -> None:
        """No replica applied update ``version``: returns (retry it) only if it is an all-reduced sum
        (``summed``) whose holders died, since the farm is then still at that version.

        Raises:
            FarmError: every replica failed applying it (and, all-reduce, none died: a replica that raises).
        """
        if summed and any(isinstance(answer, RayActorError) for _, answer in answers):
            return
        causes = "; ".join(sorted({str(answer).strip().splitlines()[-1] for _, answer in answers}))
        raise FarmError(f"every replica failed applying update {version} ({causes}); resume from the last checkpoint")
