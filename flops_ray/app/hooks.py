"""Step hooks of a run: progress lines, checkpoints by step count and by time, a graceful stop on signals, and a
warning when a group's gradient estimate stays noise."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from flops_ray.step.interface import StepReport
from flops_ray.training.loggers import Loggers
from flops_ray.training.metrics_log import MetricsLog, scalars
from flops_ray.training.trainer import StopTraining, Trainer


class Progress:
    """A step hook printing a progress line every ``every`` steps, with the ETA of the remaining steps.

    Lines name a step by its index, as the metrics and checkpoints do (``step 0`` is the first), followed
    by how many of the run's steps are done. The ETA counts step time only: replicas start before step 0.
    """

    def __init__(self, total: int, start: int, every: int, clips: ClipWatch | None = None):
        self.total, self.start, self.every = total, start, every
        self.clips = clips
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
        clipped = self.clips.summary() if self.clips is not None else ""
        print(
            f"step {report.step:>5} ({done}/{self.total} done)  loss {report.loss:.4f}  acc {acc}"
            f"  {qps:>9,.0f} queries/s  {report.seconds:.2f} s/step  eta {eta / 60:.1f} min{skipped}{clipped}",
            flush=True,
        )


class MetricsRecorder:
    """A step hook writing each step's row to the metrics log, and the same row's scalars, at the same step, to the
    run's other loggers (TensorBoard, MLflow, W&B); the farm's counters after the step go in the row."""

    def __init__(self, metrics: MetricsLog, loggers: Loggers):
        self.metrics, self.loggers = metrics, loggers

    def __call__(self, trainer: Trainer, report: StepReport) -> None:
        counters = getattr(trainer.backend, "counters", None)
        row = self.metrics.append(report, dataclasses.asdict(counters) if counters is not None else None)
        self.loggers.log(scalars(row), report.step)


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


NOISE_SNR = 2.0
"""``snr`` below this is an estimate whose squared norm is under twice its variance: at most as much signal as
noise (its mean is ``1 + |E g|^2 / tr Var``)."""


def likely_setting(snr: float, queries_per_sample: float, loss_rose: bool) -> str:
    """The setting most likely behind a group's noisy estimate, as a hint for the warning line.

    A rising loss points at the learning rate; otherwise the variance of the estimate falls as ``1/A``, so the
    query budget that would bring ``snr`` to :data:`NOISE_SNR` is named, unless it is more than 16 times the
    current one, where a sigma too small for the loss's precision (or too large for its curvature) is likelier.

    >>> likely_setting(1.5, 8, loss_rose=False)
    'queries_per_sample (about 16 would reach snr 2)'
    >>> likely_setting(1.01, 8, loss_rose=False)
    'sigma (snr 1.01 would need over 16x the queries)'
    """
    if loss_rose:
        return "lr (the loss rose over these steps)"
    signal = max(snr - 1.0, 1e-12)  # |E g|^2 / tr Var at the current budget
    factor = (NOISE_SNR - 1.0) / signal
    if factor > 16:
        return f"sigma (snr {snr:.2f} would need over 16x the queries)"
    return f"queries_per_sample (about {math.ceil(queries_per_sample * factor)} would reach snr {NOISE_SNR:g})"


class NoiseWatch:
    """A step hook printing one warning line when a group's estimate has been noise (``snr`` below
    :data:`NOISE_SNR`) for ``steps`` measured steps in a row, naming the likely setting (:func:`likely_setting`).
    Steps without a measured ``snr`` (``estimator.telemetry_every`` apart) neither count nor break a run.

    Args:
        groups: layer group names.
        steps: the run of noisy measured steps that warns (0: never).
    """

    def __init__(self, groups: list[str], steps: int):
        self.groups, self.steps = groups, steps
        self.run = [0] * len(groups)
        self.first_loss = [0.0] * len(groups)

    def __call__(self, trainer: Trainer, report: StepReport) -> None:
        if not self.steps:
            return
        for g, name in enumerate(self.groups):
            snr = report.snr[g] if g < len(report.snr) else float("nan")
            if not np.isfinite(snr):  # a step the telemetry did not measure (estimator.telemetry_every)
                continue
            if snr >= NOISE_SNR:
                self.run[g] = 0
                continue
            self.first_loss[g] = report.loss if self.run[g] == 0 else self.first_loss[g]
            self.run[g] += 1
            if self.run[g] == self.steps:
                counts = report.counts[g] if g < len(report.counts) else np.ones(1)
                hint = likely_setting(snr, float(np.mean(counts)), report.loss > self.first_loss[g])
                print(
                    f"warning: group {name}'s gradient estimate has been noise for {self.steps} measured steps "
                    f"(snr {snr:.2f} < {NOISE_SNR:g} at step {report.step}); likely setting: {hint}",
                    flush=True,
                )


class ClipWatch:
    """A step hook counting, per group, the steps whose update ``grad_clip`` scaled down, for the progress lines
    (``clipped <group> <share>`` since the run started), and printing one warning line per group when it was
    clipped in at least ``share`` of the last ``window`` steps: then the clip, not the estimate, sets the
    update's size, and the line names the median norm a clip would have to exceed.

    Args:
        groups: layer group names.
        grad_clip: the run's clip (named in the warning).
        window: steps the warning looks back over (0: never warn).
        share: the share of those steps that warns.
    """

    def __init__(self, groups: list[str], grad_clip: float, window: int = 50, share: float = 0.9):
        self.groups, self.grad_clip, self.window, self.share = groups, grad_clip, window, share
        self.steps = 0
        self.clipped = [0] * len(groups)
        self.recent: collections.deque[tuple[list[bool], list[float]]] = collections.deque(maxlen=max(window, 1))
        self.warned = [False] * len(groups)

    def __call__(self, trainer: Trainer, report: StepReport) -> None:
        if not report.clipped:
            return
        self.steps += 1
        self.clipped = [c + bool(k) for c, k in zip(self.clipped, report.clipped)]
        self.recent.append((report.clipped, report.grad_norm))
        if not self.window or len(self.recent) < self.window:
            return
        for g, name in enumerate(self.groups):
            hits = sum(clipped[g] for clipped, _ in self.recent)
            if hits >= self.share * self.window and not self.warned[g]:
                self.warned[g] = True
                median = float(np.median([norms[g] for _, norms in self.recent]))
                print(
                    f"warning: group {name}'s update was clipped in {hits} of the last {self.window} steps "
                    f"(grad_clip {self.grad_clip:g}, median norm {median:.3g}): the clip, not the estimate, "
                    f"sets the step; raise grad_clip above the norm or lower lr",
                    flush=True,
                )

    def summary(self) -> str:
        """``  clipped head 12% top 80%`` over the steps so far; empty when no update was clipped."""
        if not any(self.clipped):
            return ""
        shares = " ".join(f"{name} {c / self.steps:.0%}" for name, c in zip(self.groups, self.clipped))
        return f"  clipped {shares}"
