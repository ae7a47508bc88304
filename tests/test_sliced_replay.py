"""Sliced replay (the scalar protocol past a few replicas): members rebuilding some canonical slices each and
gathering them get the full replay's bits, which are the shards' own sums' (docs/FARM.md, sliced replay)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flops_ray.estimators.noise import draw_keys
from flops_ray.estimators.noise_layout import NoiseLayout
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.replica.replay import assign_slices, replay_gradients, sliced_replay

DEVICE = torch.device("cpu")
# Two groups: rank-1 blocks cut into several row slices, a dense block into coordinate slices, a bias.
LAYOUTS = (
    NoiseLayout(((40, 30), (30, 0), (25, 7)), slice_size=256),
    NoiseLayout(((1000, 0),), slice_size=300),
)


def _tasks() -> tuple[list[ShardTask], list[np.ndarray]]:
    """Main tasks of both groups (given out of canonical order), with their per-draw coefficients."""
    rng = np.random.default_rng(0)
    tasks = [
        ShardTask(TaskKind.MAIN, 3, g, i, (ShardItem(i, 10 + i, 0, 2 * (i + 2), 0.5),), (1.0 / (i + 1),))
        for g in range(2)
        for i in range(4)
    ][::-1]
    coefs = [rng.standard_normal(t.items[0].q1 // 2).astype(np.float32) for t in tasks]
    return tasks, coefs


def _members(world: int) -> list[list[torch.Tensor]]:
    """Every member's sliced replay, the all-gather played out: a first pass collects each member's buffer (its
    result is discarded), the second hands every member all of them in rank order."""
    tasks, coefs = _tasks()
    sent: dict[int, torch.Tensor] = {}

    def replay(rank: int, exchange) -> list[torch.Tensor]:
        return sliced_replay(tasks, coefs, LAYOUTS, 2, 5, DEVICE, rank, exchange, world)

    def record(rank: int, buf: torch.Tensor) -> list[torch.Tensor]:
        sent[rank] = buf.clone()
        return [buf] * world

    for rank in range(world):
        replay(rank, lambda buf, r=rank: record(r, buf))
    assert len({len(b) for b in sent.values()}) == 1, "an all-gather takes buffers of one length"
    return [replay(rank, lambda buf: [sent[r] for r in range(world)]) for rank in range(world)]


def test_layouts_slice_as_configured():
    assert [len(lay.slices) for lay in LAYOUTS] == [5 + 1 + 1, 4]  # 40 rows by 8, 30 dense, 25 rows of 7; 1000 by 300
    for lay in LAYOUTS:
        assert sum(p.size for p in lay.slices) == lay.size


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_sliced_replay_is_the_full_replay_bit_for_bit(world):
    tasks, coefs = _tasks()
    full = replay_gradients(tasks, coefs, LAYOUTS, 2, 5, DEVICE)
    for got in _members(world):
        for g, f in zip(got, full):
            assert torch.equal(g, f)
    assert all(f.abs().sum() > 0 for f in full)


def test_a_slice_weighed_alone_is_the_whole_draws_slice():
    """The canonical slices make the shard's own sum and a replica's slice the same arithmetic."""
    keys = draw_keys(0, 1, 0, torch.arange(6), torch.zeros(6, dtype=torch.long))
    coefs = torch.linspace(-1, 1, 6)
    lay = LAYOUTS[0]
    whole = lay.weigh(keys, coefs)
    for piece in lay.slices:
        assert torch.equal(lay.weigh_slice(keys, coefs, piece), whole[piece.offset : piece.offset + piece.size])
    np.testing.assert_allclose(whole, coefs @ lay.make(keys), rtol=1e-5, atol=1e-6)


def test_shares_cover_every_slice_once_and_balance():
    for world in (1, 2, 3, 5, 64):
        shares = assign_slices(LAYOUTS, world)
        seen = sorted((g, p.offset) for share in shares for g, ps in enumerate(share) for p in ps)
        assert seen == sorted((g, p.offset) for g, lay in enumerate(LAYOUTS) for p in lay.slices)
        loads = [sum(p.size for ps in share for p in ps) for share in shares]
        biggest = max(p.size for lay in LAYOUTS for p in lay.slices)
        assert max(loads) - min(loads) <= biggest
