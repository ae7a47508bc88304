"""Peak memory of a piece of work, measured in a fresh process so that nothing the caller allocated counts."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

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
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"the peak memory run exited with {proc.returncode}: {proc.stdout}")
    return json.loads(proc.stdout.splitlines()[-1])
