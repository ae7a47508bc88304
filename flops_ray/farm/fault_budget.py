"""The farm's retry budget: replica deaths are survived for as long as the farm keeps making progress.

A farm of preemptible nodes sees storms of deaths; what matters is whether work still gets done, not how
many replicas died. The budget counts failures since the last progress (a shard's result accepted, a
replica synced, a collective finished) and fails the farm only when ``limit`` of them come in a row.
Replacements after consecutive failures wait with exponential backoff, so a crash loop does not spin.
A replica lost while still starting, for a cause outside it (a preempted node), is not charged: it says
nothing about the work, and only a stall (no progress for ``farm.stall_timeout_s``) ends such a storm.

>>> budget = FaultBudget(limit=2)
>>> budget.failure("a replica died", "killed"), budget.failure("a replica died", "killed")
(0.0, 0.5)
>>> budget.progress()
>>> budget.failure("a replica died", "killed")
0.0
"""

from __future__ import annotations

from dataclasses import dataclass

from flops_ray.farm.errors import FarmError


@dataclass
class FaultBudget:
    """Failures in a row without progress, up to ``limit``; :meth:`progress` refills the budget.

    Args:
        limit: failures in a row (with no progress in between) the farm survives (``farm.max_retries``).
        backoff_s: wait before the second replacement in a row; it doubles with every further one.
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

    def failure(self, what: str, cause: BaseException | str) -> float:
        """Count one failure; returns the seconds to wait before replacing what failed.

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
                f"{self.streak} replica failures in a row with no shard finishing in between "
                f"(farm.max_retries={self.limit}); the last: {what}: {reason}"
            )
        return self.backoff(self.streak)

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the replacement that follows ``failures`` failures in a row."""
        return 0.0 if failures <= 1 else min(self.backoff_s * 2 ** (failures - 2), self.max_backoff_s)
