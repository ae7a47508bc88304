"""The best efficiency LR queries through the whole model can reach: forward flops against LR's assembly flops."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flops_ray.config import GroupConfig
from flops_ray.models.groups import resolve_groups


def lr_bound(model: nn.Module, group: GroupConfig, x: torch.Tensor) -> dict:
    """``F`` forward flops per row of ``x``, ``A`` LR assembly flops per query of ``group``'s linears (``2 * in *
    out`` per token, plus ``out`` per token for a bias), and the bound ``F / (F + A)``."""
    linears = resolve_groups(model, (group,), linear_outputs=True)[0].linears
    tokens: dict[str, int] = {}

    def count(name: str):
        def hook(module, inputs, out):
            tokens[name] = out[0].numel() // out.shape[-1]

        return hook

    handles = [lin.register_forward_hook(count(name)) for name, lin in linears]
    # The math kernel runs attention as matmuls the counter sees; fused kernels have no formula on CPU.
    try:
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    forward = counter.get_total_flops()
    assembly = sum(
        tokens[name] * (2 * lin.in_features * lin.out_features + (lin.out_features if lin.bias is not None else 0))
        for name, lin in linears
    )
    return {"forward_flops": forward, "assembly_flops": assembly, "bound": forward / (forward + assembly)}
