"""Peak memory of a piece of work: a process's peak (in a fresh process, so that nothing the caller allocated counts),
or the tensors a call holds at once."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable

import torch


def held_bytes(device: torch.device) -> int:
    """Most bytes this process has held so far: allocated on a CUDA ``device``, else resident (peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    # Linux reports the peak RSS in KiB, macOS in bytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def in_fresh_process(args: list[str]) -> dict:
    """Run ``python *args`` in a fresh interpreter and read the JSON object its last output line holds.

    Raises:
        RuntimeError: the process failed (its output in the message).
    """
    # A process inherits its parent's peak RSS as its own (Linux keeps it across exec), which would hide the
    # child's behind this process's: a small relay process starts the measuring one with a fresh count.
    relay = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    command = [sys.executable, "-c", relay, sys.executable, *args]
    # Its stderr (library chatter, the profiler's log lines) is shown only when it fails.
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"the peak memory run exited with {proc.returncode}: {proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def tensor_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Most bytes of tensors held at once while ``fn`` runs, above what was held before it: CUDA's allocator
    statistics, or on a CPU the profiler's record of every tensor allocation and free. Peak RSS would hide a small
    model's megabytes of activations under the process's runtime and allocator slack."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage  # + an allocation, - a free
        peak = max(peak, live)
    return peak
