"""The all-reduce's sum in canonical order: per-task partials held on many replicas, added as one replica would.

The in-process backend adds each main task's float32 ``(P_g,)`` partial into a float64 sum in task order
(:func:`~flops_ray.step.forward.reduce_in_order`). Floating-point addition is not associative, so a sum whose
order follows which replica ran which task, or which finished first, differs in its last bits from run to
run. Here every replica keeps each of its tasks' partials apart; the members exchange them, a slice of
coordinates at a time, and every member adds all of them in task order, exactly as the in-process backend
does: the sum depends on the tasks only, never on the replicas, their number or the order of completion.

>>> import torch
>>> keys = [(0, 0, "main", i) for i in range(3)]
>>> parts = {k: torch.tensor([2.0**25, 1.0]) * (-1) ** k[3] for k in keys}
>>> ordered_sums([2], [keys[::-1]], 0, parts, lambda buf: [buf])[0].tolist()  # one member, held in any order
[33554432.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from flops_ray.messages import TaskKey

Exchange = Callable[[torch.Tensor], list[torch.Tensor]]
"""An all-gather: this member's ``(depth, width)`` buffer in, every member's (in rank order) out."""

EXCHANGE_BYTES = 64 * 2**20
"""Most bytes of partials a member receives per exchange: the coordinates go in slices of this size."""


def ordered_sums(
    sizes: Sequence[int],
    layout: Sequence[Sequence[TaskKey]],
    rank: int,
    partials: Mapping[TaskKey, torch.Tensor],
    exchange: Exchange,
    device: torch.device | str = "cpu",
    max_bytes: int = EXCHANGE_BYTES,
) -> list[torch.Tensor]:
    """Per group ``(P_g,)`` float64 sums of every member's partials, added in task order (group, then index).

    Args:
        sizes: each group's parameter count ``P_g``.
        layout: per member (in rank order), the keys ``(step, group, kind, index)`` of the partials it holds.
        rank: this member's place in ``layout``.
        partials: this member's ``(P_g,)`` float32 partial of each task of ``layout[rank]``.
        exchange: the all-gather (every member calls it with buffers of the same shape, the same times).
        device: where the buffers and sums live (a member holding no partial still takes part).
        max_bytes: most bytes one exchange gathers.

    Returns:
        The sums, identical on every member and to the in-process backend's sums of the same partials.
    """
    grads = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
    for g, size in enumerate(sizes):
        rows = [[key for key in keys if key[1] == g] for keys in layout]
        depth = max((len(r) for r in rows), default=0)
        if not depth:
            continue
        # (index, member, row): where each task's partial lands in the gathered buffers, in task order.
        order = sorted((key[3], member, row) for member, keys in enumerate(rows) for row, key in enumerate(keys))
        width = max(1, max_bytes // (4 * depth * len(layout)))
        for c0 in range(0, size, width):
            c1 = min(size, c0 + width)
            buf = torch.zeros(depth, c1 - c0, dtype=torch.float32, device=device)
            for row, key in enumerate(rows[rank]):
                buf[row] = partials[key][c0:c1]
            gathered = exchange(buf)
            acc = grads[g][c0:c1]
            for _, member, row in order:
                acc += gathered[member][row]  # float32 into float64, as reduce_in_order adds
    return grads
