"""The all-reduce's sum in task order: whichever members hold which partials, every member gets the in-process sum,
bit for bit (no Ray: members are threads around an in-memory all-to-all and all-gather)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from flops_ray.messages import ShardResult, ShardTask, TaskKind
from flops_ray.replica.ordered_sum import ordered_sums
from flops_ray.step.backend import reduce_in_order

SIZES = [37, 5]
TASKS = [ShardTask(TaskKind.MAIN, 0, g, i, ()) for g in range(len(SIZES)) for i in range(7)]


def _partials(seed: int) -> dict:
    """Float32 partials of mixed magnitudes, so the order of a float64 sum shows in its last bits."""
    gen = torch.Generator().manual_seed(seed)
    return {
        t.key: torch.randn(SIZES[t.group], generator=gen) * 10.0 ** float(torch.randint(-6, 7, (), generator=gen))
        for t in TASKS
    }


def _all_members(layout: list[list], partials: dict, max_bytes: int) -> list[list[torch.Tensor]]:
    """Every member's :func:`ordered_sums`, each in a thread, exchanging through a shared list and a barrier (the
    collectives check that every member passes buffers of one shape, as torch.distributed requires)."""
    members = len(layout)
    barrier, shelf, out = threading.Barrier(members), [None] * members, [None] * members

    def member(rank: int) -> None:
        def meet(sent):
            shelf[rank] = sent
            barrier.wait()
            got = list(shelf)
            barrier.wait()
            return got

        def all_gather(buf: torch.Tensor) -> list[torch.Tensor]:
            got = meet(buf.clone())
            assert len({g.shape for g in got}) == 1
            return got

        def all_to_all(bufs: list[torch.Tensor]) -> list[torch.Tensor]:
            assert len(bufs) == members and len({b.shape for b in bufs}) == 1
            return [theirs[rank].clone() for theirs in meet(bufs)]

        mine = {key: partials[key] for key in layout[rank]}
        out[rank] = ordered_sums(SIZES, layout, rank, mine, all_gather, all_to_all, max_bytes=max_bytes)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(members)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("members", [1, 2, 3, 5])
@pytest.mark.parametrize("max_bytes", [64, 2**20])
def test_every_member_gets_the_in_process_sum(members, max_bytes):
    """Random assignments of tasks to members (some hold none), slices of 64 bytes or the whole vector."""
    partials = _partials(members)
    results = [ShardResult(t.key, np.zeros(0), grad=partials[t.key].numpy()) for t in TASKS]
    want = reduce_in_order(TASKS, results, SIZES)
    rng = np.random.default_rng(members)
    for _ in range(3):
        shuffled, owner = rng.permutation(len(TASKS)), rng.integers(0, members, len(TASKS))
        layout = [[TASKS[i].key for i, o in zip(shuffled, owner) if o == m] for m in range(members)]
        for sums in _all_members(layout, partials, max_bytes):
            assert all(torch.equal(s, torch.from_numpy(w)) for s, w in zip(sums, want))


def test_the_order_shows_in_the_bits():
    """Guards the test above: these partials summed in another order (each member's, then across members, as the
    all-reduce once did) give other bits."""
    partials = _partials(0)
    want = reduce_in_order(TASKS, [ShardResult(t.key, np.zeros(0), grad=partials[t.key].numpy()) for t in TASKS], SIZES)
    halves = [TASKS[::2], TASKS[1::2]]
    sums = [torch.zeros(n, dtype=torch.float64) for n in SIZES]
    for half in halves:
        part = [torch.zeros(n, dtype=torch.float64) for n in SIZES]
        for t in reversed(half):
            part[t.group] += partials[t.key]
        for g in range(len(SIZES)):
            sums[g] += part[g]
    assert not all(torch.equal(s, torch.from_numpy(w)) for s, w in zip(sums, want))
