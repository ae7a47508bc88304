"""The all-reduce's sum in canonical order: per-task partials held on many replicas, added as one replica would.

The in-process backend adds each main task's float32 ``(P_g,)`` partial into a float64 sum in task order
(:func:`~flops_ray.step.backend.reduce_in_order`). Floating-point addition is not associative, so a sum whose
order follows which replica ran which task, or which finished first, differs in its last bits from run to
run. Here every replica keeps each of its tasks' partials apart, and each member owns one contiguous range of
every group's coordinates: the members send each range's partials to its owner (an all-to-all), every owner adds
the partials of its range in task order, exactly as the in-process backend does, and one all-gather hands every
member the owners' sums. The sum depends on the tasks only, never on the replicas, their number or the order of
completion; a member receives its tasks' share of every partial plus the sum, about ``4 P_g x tasks / members +
8 P_g`` bytes per group, not every task's whole partial.

>>> import torch
>>> keys = [(0, 0, "main", i) for i in range(3)]
>>> parts = {k: torch.tensor([2.0**25, 1.0]) * (-1) ** k[3] for k in keys}
>>> ordered_sums([2], [keys[::-1]], 0, parts, lambda buf: [buf], lambda bufs: bufs)[0].tolist()  # one member
[33554432.0, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from flops_ray.messages import TaskKey

AllGather = Callable[[torch.Tensor], list[torch.Tensor]]
"""This member's buffer in, every member's (in rank order) out; every member calls it with one shape."""
AllToAll = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""This member's buffer for each member (in rank order) in, each member's buffer for this one out."""

EXCHANGE_BYTES = 64 * 2**20
"""Most bytes of partials a member sends per all-to-all: the owners' ranges go in rounds of this size."""


def owned_ranges(size: int, world: int) -> list[tuple[int, int]]:
    """Each member's contiguous range ``[lo, hi)`` of ``size`` coordinates (the last ones may be short or empty)."""
    width = math.ceil(size / world)
    return [(min(size, r * width), min(size, (r + 1) * width)) for r in range(world)]


def ordered_sums(
    sizes: Sequence[int],
    layout: Sequence[Sequence[TaskKey]],
    rank: int,
    partials: Mapping[TaskKey, torch.Tensor],
    all_gather: AllGather,
    all_to_all: AllToAll,
    device: torch.device | str = "cpu",
    max_bytes: int = EXCHANGE_BYTES,
) -> list[torch.Tensor]:
    """Per group ``(P_g,)`` float64 sums of every member's partials, added in task order (group, then index).

    Args:
        sizes: each group's parameter count ``P_g``.
        layout: per member (in rank order), the keys ``(step, group, kind, index)`` of the partials it holds.
        rank: this member's place in ``layout``.
        partials: this member's ``(P_g,)`` float32 partial of each task of ``layout[rank]``.
        all_gather: the all-gather (every member calls the collectives with the same shapes, the same times).
        all_to_all: the all-to-all.
        device: where the buffers and sums live (a member holding no partial still takes part).
        max_bytes: most bytes one all-to-all sends.

    Returns:
        The sums, identical on every member and to the in-process backend's sums of the same partials.
    """
    world = len(layout)
    grads = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
    for g, size in enumerate(sizes):
        rows = [[key for key in keys if key[1] == g] for keys in layout]
        depth = max((len(r) for r in rows), default=0)
        if not depth:
            continue
        # (index, member, row): where each task's partial lands in the received buffers, in task order.
        order = sorted((key[3], member, row) for member, keys in enumerate(rows) for row, key in enumerate(keys))
        ranges = owned_ranges(size, world)
        width = math.ceil(size / world)
        mine = torch.zeros(width, dtype=torch.float64, device=device)
        step = max(1, max_bytes // (4 * depth * world))
        for c0 in range(0, width, step):
            c1 = min(width, c0 + step)
            sends = []
            for lo, hi in ranges:
                buf = torch.zeros(depth, c1 - c0, dtype=torch.float32, device=device)
                a, b = min(hi, lo + c0), min(hi, lo + c1)
                for row, key in enumerate(rows[rank]):
                    buf[row, : b - a] = partials[key][a:b]
                sends.append(buf)
            got = all_to_all(sends)
            acc = mine[c0:c1]
            for _, member, row in order:
                acc += got[member][row]  # float32 into float64, as reduce_in_order adds
        for (lo, hi), theirs in zip(ranges, all_gather(mine)):
            grads[g][lo:hi] = theirs[: hi - lo]
    return grads
