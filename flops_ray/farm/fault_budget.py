"""The farm's retry budget: replica deaths are survived for as long as the farm keeps making progress.

A farm of preemptible nodes sees storms of deaths; what matters is whether work still gets done, not how
many replicas died. The budget counts failures since the last progress (a shard's result accepted, a
collective finished; a replica coming up is not progress, or a shard that kills every replica it lands on
would loop forever) and fails the farm when more than ``limit`` of them come in a row. Which failures are
charged is the :class:`~flops_ray.farm.fault_policy.FaultPolicy`'s decision. Replacements of one slot in a
row wait with exponential backoff (:meth:`FaultBudget.backoff`), so a crash loop does not spin.

>>> budget = FaultBudget(limit=1)
>>> budget.failure("a replica died", "killed")
>>> budget.progress()
>>> budget.failure("a replica died", "killed")
>>> [budget.backoff(n) for n in (1, 2, 3, 6, 7)]
[0.0, 0.5, 1.0, 8.0, 10.0]
"""

from __future__ import annotations

from dataclasses import dataclass

from flops_ray.farm.errors import FarmError


@dataclass
class FaultBudget:
    """Failures in a row without progress, up to ``limit``; :meth:`progress` refills the budget.

    Args:
        limit: failures in a row (with no progress in between) the farm survives (``farm.max_retries``).
        backoff_s: wait before a slot's second replacement in a row; it doubles with every further one.
        max_backoff_s: the longest wait before a replacement.
    """

    limit: int
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    streak: int = 0
    """Failures since the last progress."""

    def progress(self) -> None:
        """The farm finished something: the budget is full again."""
        self.streak = 0

    def failure(self, what: str, cause: BaseException | str) -> None:
        """Count one failure.

        Args:
            what: what failed, for the error (``"a replica died running task (0, 'main', 0, 1)"``).
            cause: the exception (or its text) that reported the failure.

        Raises:
            FarmError: more than ``limit`` failures in a row with no progress in between.
        """
        self.streak += 1
        if self.streak > self.limit:
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise FarmError(
                f"{self.streak} replica failures in a row with no shard result or collective finishing in "
                f"between (farm.max_retries={self.limit}); the last: {what}: {reason}"
            )

    def backoff(self, losses: int) -> float:
        """Seconds to wait before replacing a slot's replica after ``losses`` losses of that slot in a row."""
        return 0.0 if losses <= 1 else min(self.backoff_s * 2 ** (losses - 2), self.max_backoff_s)
