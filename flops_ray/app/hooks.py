"""Step hooks of a run: progress lines, checkpoints by step count and by time, and a graceful stop on signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from flops_ray.step.interface import StepReport
from flops_ray.training.metrics_log import MetricsLog
from flops_ray.training.trainer import StopTraining, Trainer


class Progress:
    """A step hook printing a progress line every ``every`` steps, with the ETA of the remaining steps.

    Lines name a step by its index, as the metrics and checkpoints do (``step 0`` is the first), followed
    by how many of the run's steps are done. The ETA counts step time only: replicas start before step 0.
    """

    def __init__(self, total: int, start: int, every: int):
        self.total, self.start, self.every = total, start, every
        self.seconds = 0.0

    def __call__(self, trainer: Trainer, report: StepReport) -> None:
        self.seconds += report.seconds
        done = trainer.step_count
        if done % self.every and done != self.total:
            return
        eta = (self.total - done) * self.seconds / (done - self.start)
        acc = f"{report.accuracy:.3f}" if report.accuracy is not None else "  -  "
        qps = report.queries / report.seconds if report.seconds > 0 else 0.0
        skipped = f"  skipped {report.skipped} queries" if report.skipped else ""
        print(
            f"step {report.step:>5} ({done}/{self.total} done)  loss {report.loss:.4f}  acc {acc}"
            f"  {qps:>9,.0f} queries/s  {report.seconds:.2f} s/step  eta {eta / 60:.1f} min{skipped}",
            flush=True,
        )


class Checkpointer:
    """A step hook saving a checkpoint every ``every`` steps and every ``minutes`` (0 disables either).

    Metrics rows go first: a checkpoint at step N promises every metrics row before N is on disk.
    """

    def __init__(self, metrics: MetricsLog, path: Path, every: int, minutes: float):
        self.metrics, self.path, self.every, self.minutes = metrics, path, every, minutes
        self.last = time.monotonic()

    def save(self, trainer: Trainer) -> None:
        self.metrics.flush()
        trainer.save(self.path)
        self.last = time.monotonic()

    def __call__(self, trainer: Trainer, report: StepReport) -> None:
        by_step = self.every and trainer.step_count % self.every == 0
        if by_step or (self.minutes and time.monotonic() - self.last >= 60 * self.minutes):
            self.save(trainer)


class GracefulStop:
    """While active, the first SIGINT or SIGTERM (Ctrl-C, ``ray job stop``) asks the run to stop after the
    current step, so the checkpoint holds a whole step; a second one interrupts at once.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        # os.write, not print: a handler may run in the middle of a print, which must not be re-entered.
        os.write(2, f"{self.requested}: stopping after this step (send it again to stop at once)\n".encode())

    def hook(self, trainer: Trainer, report: StepReport) -> None:
        """The step hook: ends the run once a stop was asked for."""
        if self.requested:
            raise StopTraining(self.requested)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be restored
                signal.signal(sig, handler)
