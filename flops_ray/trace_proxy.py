"""Clean-pass trace proxies: how noisy a sample's gradient estimate will be, read off the unperturbed forward.

For a linear ``y = W h + b`` with output error ``g = dL/dy``, a query's term is ``c eps h^T`` with
``c ~ g . eps`` (to first order in ``sigma``), so its trace is ``Tr Cov ~ (d + 1) |g|^2 (|h|^2 + 1)``
per token; the same ``g h^T`` is the weight part of the parameter gradient that SPSA/ES estimate, whose
trace is ``(P + 1) |grad L|^2``. The proxy of sample ``j`` and group ``g`` is therefore

    T_j ~ |dL/dlogits_j|^2 * sum over the group's linears and tokens of (|h_t|^2 + 1)

exact in its sample-to-sample ratios for the classifier head (where ``dL/dy`` is ``dL/dlogits``, a
cheap autograd step through the loss alone, never through the model) and, for deeper groups, a
stand-in that takes the back-propagated error's size to follow the output error's. Only relative
values matter to an allocator. ``jobs/bench_allocation.py`` measures how close allocating from it
comes to allocating from the exact traces. A proxy uses the clean pass only, never a query's noise,
so allocating from it keeps the estimate unbiased.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from flops_ray.groups import ResolvedGroup
from flops_ray.losses import LossFn, model_outputs


@contextlib.contextmanager
def _input_norms(groups: list[ResolvedGroup], out: torch.Tensor):
    """While active, add each linear's ``sum_t (|h_t|^2 + 1)`` per sample to ``out[:, group]`` ``(n, G)``."""

    def make_hook(g: int, bias: bool):
        def hook(module, inputs, output):
            h = inputs[0].detach()
            h = h.reshape(h.shape[0], -1, h.shape[-1]).to(out.dtype)  # (n, T, C_in)
            out[:, g] += (h**2).sum((1, 2)) + (h.shape[1] if bias else 0)

        return hook

    handles = [
        lin.register_forward_hook(make_hook(g, lin.bias is not None))
        for g, group in enumerate(groups)
        for _, lin in group.linears
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def clean_pass(
    model: nn.Module, groups: list[ResolvedGroup], x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean losses ``(n,)``, embeddings ``(n, D)`` and trace proxies ``(n, G)`` of the rows ``x``, ``y``.

    A group without linears gets ``|dL/dlogits|^2`` alone; a loss that autograd cannot differentiate
    gives NaN proxies (allocators then fall back to the trace memory).
    """
    norms = torch.zeros(len(x), len(groups), dtype=torch.float64, device=x.device)
    with _input_norms(groups, norms):
        logits, emb = model_outputs(model, x)
    with torch.enable_grad():
        out = logits.detach().requires_grad_(True)
        losses = loss_fn(out, y)
        if losses.requires_grad:
            (grad,) = torch.autograd.grad(losses.sum(), out)
            error = (grad.double() ** 2).flatten(1).sum(1)  # (n,)
        else:
            error = torch.full((len(x),), float("nan"), dtype=torch.float64, device=x.device)
    no_linears = torch.tensor([not g.linears for g in groups], device=x.device)
    proxy = error[:, None] * torch.where(no_linears, 1.0, norms)
    return losses.detach(), emb, proxy
