"""The allocators' fit for the next step, run in a thread beside the step that started it.

A step samples its counts from the allocators' current state, then starts :meth:`AllocatorFit.start`: the
fit (``Allocator.update``) runs on copies, from the step's main round until the next step's allocation
adopts it (:meth:`AllocatorFit.settle`, which a checkpoint calls too). A failed step, or state loaded from a
checkpoint, drops it (:meth:`AllocatorFit.discard`); the copies make that safe while it still runs. Its
result does not depend on when it finishes.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from flops_ray.allocation.allocators import AllocationFeatures, Allocator

_FITS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flops-allocator-fit")
"""Runs allocator fits beside the step that started them (one at a time, process-wide)."""

FitWork = tuple[AllocationFeatures, int, int, torch.Generator]
"""One group's ``Allocator.update`` arguments: features, budget, floor, generator."""


def twin(allocator: Allocator) -> Allocator:
    """A copy of ``allocator`` whose state (``state_dict``) is its own: its fit leaves the original as it was."""
    copied = copy.copy(allocator)
    copied.load_state_dict({k: v.clone() for k, v in allocator.state_dict().items()})
    return copied


class AllocatorFit:
    """The pending fit of ``allocators`` (one per group), adopted into them by :meth:`settle`."""

    def __init__(self, allocators: list[Allocator]):
        self.allocators = allocators
        self._pending: Future[tuple[list[dict], float]] | None = None
        self._step = -1
        self._unreported = 0.0
        """Seconds of fits adopted since :meth:`take_seconds` (a checkpoint may adopt one between steps)."""

    def start(self, step: int, work: list[FitWork]) -> None:
        """Fit copies of the allocators, group ``g`` with ``work[g]``, in the fit thread."""
        copies = [twin(a) for a in self.allocators]

        def fit() -> tuple[list[dict], float]:
            t0 = time.perf_counter()
            for allocator, (feats, total, minimum, gen) in zip(copies, work):
                allocator.update(feats, total, minimum, gen)
            return [a.state_dict() for a in copies], time.perf_counter() - t0

        self._pending, self._step = _FITS.submit(fit), step

    def settle(self) -> float:
        """Adopt the pending fit, waiting while it still runs; call before reading allocator state.

        Returns:
            The fit's seconds (0 when none was pending).

        Raises:
            Exception: the fit's own error, once, noting its step; the allocators keep their state from
                before it (a checkpoint written after the error holds that state).
        """
        if self._pending is None:
            return 0.0
        pending, self._pending = self._pending, None
        try:
            states, seconds = pending.result()
        except BaseException as exc:
            if not pending.done():  # interrupted while waiting: the fit is still the next step's to adopt
                self._pending = pending
            else:
                exc.add_note(f"in the allocator fit of step {self._step} (its state was not adopted)")
            raise
        for allocator, state in zip(self.allocators, states):
            allocator.load_state_dict(state)
        self._unreported += seconds
        return seconds

    def discard(self) -> None:
        """Drop the pending fit, which may still run on its copies: the allocators keep their state."""
        self._pending = None

    def take_seconds(self) -> float:
        """Seconds of the fits adopted since the last call (a step's report)."""
        seconds, self._unreported = self._unreported, 0.0
        return seconds
