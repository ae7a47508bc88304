"""How many intra-op threads a replica computes on: a CPU's float32 products round by their thread count, so the
in-process backend uses the farm's count and the two give the same parameters bit for bit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def replica_threads(num_cpus: float) -> int:
    """Threads of a replica holding ``num_cpus`` logical CPUs: one per CPU (Ray reserves CPUs, not threads, and
    more threads than CPUs would oversubscribe the node), at least one."""
    return max(1, round(num_cpus))


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[int]:
    """Run the body on ``n`` torch intra-op threads, then restore the count; yields the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
