"""Timers of the benchmarks: wall seconds with a device's queued work, the best of repetitions, torch threads, busy CPU."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flops_ray.replica.threads import intra_op_threads


def seconds(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall seconds of ``fn``; on a CUDA ``device`` the work it queued is waited for before and after."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def best_seconds(reps: int, fn: Callable[[], object]) -> float:
    """The fastest of ``reps`` runs of ``fn``: on a shared machine, the least disturbed one."""
    return min(seconds(fn) for _ in range(reps))


def torch_threads(n: int) -> contextlib.AbstractContextManager[int]:
    """Run the body on ``n`` torch threads (at most this process's), then restore the count; yields the count."""
    return intra_op_threads(max(1, min(n, torch.get_num_threads())))


def single_threaded(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes on one torch thread: the in-process reference for one replica on one CPU."""
    with torch_threads(1):
        return seconds(fn)


def busy_cpu_seconds() -> float:
    """CPU seconds this machine's cores have been busy, all processes (Linux ``/proc/stat``; 0 elsewhere)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
