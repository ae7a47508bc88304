"""A replica's memory is bounded by one chunk of rows, never by the items or queries of a shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# One process per measurement: peak RSS only grows, so each shard size needs a fresh count. SPSA's group is
# a 1024 x 1024 linear on one token (512 rows of its noise: 2 GiB, a chunk of 8 rows: 32 MiB); LR's a
# 128 x 128 linear on 1024 tokens (512 rows of its inputs and noise: 512 MiB, a chunk: 8 MiB).
_PEAK = r"""
import json, resource, sys
import torch
from torch import nn
from flops_ray.config import EstimatorConfig, GroupConfig
from flops_ray.replica.engine import QueryEngine
from flops_ray.messages import ShardItem, ShardTask, TaskKind

kind, items, task_kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
width, tokens = (128, 1024) if kind == "lr" else (1024, 1)


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, width), nn.Linear(width, width), nn.Linear(width, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))).mean(1))


torch.manual_seed(0)
model = TokenNet()
groups = (GroupConfig("big", ("fc2",), 1e-3, 2),)
est = EstimatorConfig(kind=kind, max_rows=8, pilot_queries=2)
engine = QueryEngine(model, groups, est, root_seed=0)
engine.set_batch(0, torch.randn(items, tokens, 16), torch.randint(4, (items,)))
shard = tuple(ShardItem(p, p, 0, 2, 1.0) for p in range(items))
weights = None if task_kind == "pilot" else (1.0,) * items
task = ShardTask(TaskKind(task_kind), 0, 0, 0, shard, weights=weights)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine.run(task)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))
"""


def _peak_bytes(kind: str, items: int, task_kind: str) -> int:
    relay = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    command = [sys.executable, "-c", relay, sys.executable, "-c", _PEAK, kind, str(items), task_kind]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, timeout=600).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak RSS Linux keeps per process")
@pytest.mark.parametrize(("kind", "task_kind"), [("lr", "main"), ("spsa", "main"), ("spsa", "pilot")])
def test_peak_memory_does_not_grow_with_the_shard(kind, task_kind):
    """256 samples (512 queries) cost no more than 8 samples plus 128 MiB, where holding every row's noise
    (SPSA: 2 GiB) or inputs and noise (LR: 512 MiB) would not fit; a pilot's traces keep ``trace_coords``
    numbers per row."""
    small, large = _peak_bytes(kind, 8, task_kind), _peak_bytes(kind, 256, task_kind)
    assert large - small < 128 * 2**20, f"peak grew by {(large - small) / 2**20:.0f} MiB"


# A fresh process, as a replica is; glibc starts at its default mmap threshold (128 KiB, pinned by the
# environment so that whatever importing torch allocated cannot have raised it already).
_HEAP = r"""
import ctypes, ctypes.util, json, resource
import torch
from flops_ray.replica.heap import keep_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL(ctypes.util.find_library("c"))
mapped = None
if hasattr(libc, "mallinfo2"):
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblks
kept = keep_freed_memory()
block = torch.ones(1 << 20)  # 4 MiB
if hasattr(libc, "mallinfo2"):
    mapped = libc.mallinfo2().hblks - before  # blocks with a mapping of their own, this one's included
del block
for _ in range(10):
    torch.ones(1 << 20)  # the first few land higher up the heap until freed neighbours merge to fit one
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(1 << 20)  # allocated, touched and freed, as a chunk's noise is
print(json.dumps([kept, mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="counts the page faults Linux keeps per process")
def test_freed_blocks_are_reused_without_page_faults():
    """After :func:`~flops_ray.replica.heap.keep_freed_memory`, a 4 MiB block lives on the heap, not in a mapping of its
    own, and freed and allocated again it reuses its pages: mapping it afresh each time would fault its 1,024
    pages in again (20,480 faults over the loop)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    command = [sys.executable, "-c", _HEAP]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, timeout=600, env=env).stdout
    kept, mapped, faults = json.loads(out.splitlines()[-1])
    if not kept:
        pytest.skip("not glibc: mallopt is unavailable")
    assert mapped in (None, 0), f"a 4 MiB block got a mapping of its own ({mapped} new mapped blocks)"
    assert faults < 1024, f"{faults} page faults over 20 reuses of a 4 MiB block"
