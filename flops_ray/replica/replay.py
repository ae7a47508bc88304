"""The scalar protocol's other half: a step's gradient rebuilt from its seeds and per-draw coefficients.

An SPSA/ES term is ``c_q * sign_q * z_d`` with ``z_d`` a pure function of the draw's key
(:mod:`flops_ray.estimators.noise`), so a shard's whole contribution is ``sum_d coefs[d] z_d``: a replica returns
``coefs (D,)`` instead of ``(P_g,)`` numbers, and the replicas regenerate the noise to rebuild the sum. Bytes on
the wire grow with queries, not with ``P``.

Rebuilding the whole sum on every replica costs each of them the noise of the whole step, which caps the farm's
speed-up. Sliced replay splits it: each of ``world`` members rebuilds some canonical slices of the draws
(:attr:`NoiseLayout.slices`, computed alone with the bits of the whole) and one all-gather assembles them, so
the result is the full replay's, bit for bit, whatever the number of members.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flops_ray.estimators.base import RowPlan
from flops_ray.estimators.noise_layout import NoiseLayout, Slice
from flops_ray.messages import ShardTask
from flops_ray.replica.ordered_sum import AllGather

BLOCK_BYTES = {"cpu": 4 * 2**20, "cuda": 64 * 2**20}
"""Noise made at a time while replaying, by device: a block of draws of at most this many bytes of normals
(float32). A CPU block stays in cache until its weighted sum reads it back; a GPU wants few, large kernels."""


def replay_slices(
    tasks: Sequence[ShardTask],
    coefs: Sequence[np.ndarray],
    layouts: Sequence[NoiseLayout],
    unit: int,
    root_seed: int,
    device: torch.device,
    pieces: Sequence[Sequence[Slice]],
) -> list[torch.Tensor]:
    """Per group, float64 ``sum_tasks sum_d coefs[d] z_d`` at the coordinates of ``pieces[g]`` (concatenated in
    that order), tasks in canonical order.

    Args:
        tasks: the step's weighted (``main``) tasks.
        coefs: per task, ``(D,)`` the weighted coefficient of each of its draws in first-use order.
        layouts: per group, how a draw fills its ``(P_g,)`` (:meth:`Estimator.noise_layout` of a
            parameter-perturbing family).
        unit: queries per draw (2 for antithetic pairs).
        root_seed: the run's root seed.
        device: where the noise is made and the sums kept.
        pieces: per group, the slices of its layout to rebuild (all of :attr:`NoiseLayout.slices`: the whole).
    """
    out = [torch.zeros(sum(p.size for p in ps), dtype=torch.float64, device=device) for ps in pieces]
    for task, c in sorted(zip(tasks, coefs), key=lambda tc: tc[0].order):
        keys = RowPlan.of(task, unit, root_seed, device).keys
        if len(keys) != len(c):
            raise ValueError(f"task {task.key} has {len(keys)} noise draws but {len(c)} coefficients")
        layout, wanted = layouts[task.group], tuple(pieces[task.group])
        if not wanted:
            continue
        c = torch.as_tensor(c, dtype=torch.float32, device=device)
        # The whole draw in one noise call where every slice is wanted (the same bits as slice by slice).
        whole = wanted == layout.slices
        block = max(1, BLOCK_BYTES.get(device.type, BLOCK_BYTES["cuda"]) // (4 * layout.normals))
        part = torch.zeros(len(out[task.group]), dtype=torch.float32, device=device)
        for s in range(0, len(keys), block):
            k, w = keys[s : s + block], c[s : s + block]
            part += layout.weigh(k, w) if whole else torch.cat([layout.weigh_slice(k, w, p) for p in wanted])
        out[task.group] += part
    return out


def replay_gradients(
    tasks: Sequence[ShardTask],
    coefs: Sequence[np.ndarray],
    layouts: Sequence[NoiseLayout],
    unit: int,
    root_seed: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """Per group ``(P_g,)`` float64 ``sum_tasks sum_d coefs[d] z_d``, tasks in canonical order (:func:`replay_slices`
    of every slice)."""
    return replay_slices(tasks, coefs, layouts, unit, root_seed, device, [lay.slices for lay in layouts])


def assign_slices(layouts: Sequence[NoiseLayout], world: int) -> list[list[list[Slice]]]:
    """Per member, per group, the slices it rebuilds: the largest first, each to the least loaded member (ties
    to the lowest rank), so every member's share of coordinates is within one slice of the mean. A function of
    the layouts and ``world`` only: every member computes the same assignment."""
    shares = [[[] for _ in layouts] for _ in range(world)]
    load = [0] * world
    pieces = [(p.size, g, i) for g, lay in enumerate(layouts) for i, p in enumerate(lay.slices)]
    for size, g, i in sorted(pieces, key=lambda t: (-t[0], t[1], t[2])):
        member = min(range(world), key=lambda r: (load[r], r))
        shares[member][g].append(layouts[g].slices[i])
        load[member] += size
    for share in shares:
        for ps in share:
            ps.sort(key=lambda p: p.offset)
    return shares


def sliced_replay(
    tasks: Sequence[ShardTask],
    coefs: Sequence[np.ndarray],
    layouts: Sequence[NoiseLayout],
    unit: int,
    root_seed: int,
    device: torch.device,
    rank: int,
    exchange: AllGather,
    world: int,
) -> list[torch.Tensor]:
    """:func:`replay_gradients`, this member rebuilding only its share (:func:`assign_slices`) and one
    ``exchange`` (all-gather, float64) assembling every member's: per group ``(P_g,)`` float64, the full replay's
    bits on every member.

    Args:
        rank: this member's place among the ``world`` members.
        exchange: the all-gather (every member calls it once, with buffers of the same length).
    """
    shares = assign_slices(layouts, world)
    mine = replay_slices(tasks, coefs, layouts, unit, root_seed, device, shares[rank])
    width = max(sum(p.size for ps in share for p in ps) for share in shares)
    buf = torch.zeros(width, dtype=torch.float64, device=device)
    flat = torch.cat(mine) if mine else buf[:0]
    buf[: len(flat)] = flat
    gathered = exchange(buf)
    grads = [torch.zeros(lay.size, dtype=torch.float64, device=device) for lay in layouts]
    for share, got in zip(shares, gathered):
        at = 0
        for g, ps in enumerate(share):
            for p in ps:
                grads[g][p.offset : p.offset + p.size] = got[at : at + p.size]
                at += p.size
    return grads
