"""The scalar protocol's other half: a step's gradient rebuilt from its seeds and per-draw coefficients.

An SPSA/ES term is ``c_q * sign_q * z_d`` with ``z_d`` a pure function of the draw's key
(:mod:`flops_ray.estimators.noise`), so a shard's whole contribution is ``sum_d coefs[d] z_d``: a replica returns
``coefs (D,)`` instead of ``(P_g,)`` numbers, and every replica regenerates the noise to rebuild the sum.
Bytes on the wire grow with queries, not with ``P``; each replica pays the noise of the whole step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flops_ray.estimators.base import RowPlan
from flops_ray.estimators.noise import NoiseLayout
from flops_ray.messages import ShardTask

BLOCK_BYTES = {"cpu": 4 * 2**20, "cuda": 64 * 2**20}
"""Noise made at a time while replaying, by device: a block of draws of at most this many bytes of normals
(float32). A CPU block stays in cache until its weighted sum reads it back; a GPU wants few, large kernels."""


def replay_gradients(
    tasks: Sequence[ShardTask],
    coefs: Sequence[np.ndarray],
    layouts: Sequence[NoiseLayout],
    unit: int,
    root_seed: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """Per group ``(P_g,)`` float64 ``sum_tasks sum_d coefs[d] z_d``, tasks in canonical order.

    Args:
        tasks: the step's weighted (``main``) tasks.
        coefs: per task, ``(D,)`` the weighted coefficient of each of its draws in first-use order.
        layouts: per group, how a draw fills its ``(P_g,)`` (:meth:`Estimator.noise_layout` of a
            parameter-perturbing family).
        unit: queries per draw (2 for antithetic pairs).
        root_seed: the run's root seed.
        device: where the noise is made and the sums kept.
    """
    grads = [torch.zeros(lay.size, dtype=torch.float64, device=device) for lay in layouts]
    for task, c in sorted(zip(tasks, coefs), key=lambda tc: tc[0].order):
        keys = RowPlan.of(task, unit, root_seed, device).keys
        if len(keys) != len(c):
            raise ValueError(f"task {task.key} has {len(keys)} noise draws but {len(c)} coefficients")
        layout = layouts[task.group]
        c = torch.as_tensor(c, dtype=torch.float32, device=device)
        block = max(1, BLOCK_BYTES.get(device.type, BLOCK_BYTES["cuda"]) // (4 * layout.normals))
        part = torch.zeros(layout.size, dtype=torch.float32, device=device)
        for s in range(0, len(keys), block):
            part += layout.weigh(keys[s : s + block], c[s : s + block])
        grads[task.group] += part
    return grads
