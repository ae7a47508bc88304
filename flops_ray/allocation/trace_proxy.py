"""Clean-pass trace proxies: how noisy a sample's gradient estimate will be, read off the unperturbed pass.

For a linear ``y_t = W h_t + b`` (tokens ``t``) with output errors ``e_t = dL/dy_t``, a query's term is
``c sum_t eps_t h_t^T`` with ``c ~ sum_t e_t . eps_t`` to first order in ``sigma``, so its trace is about
``d * (sum_t |e_t|^2) * (sum_t (|h_t|^2 + 1))``; the weight part of the parameter gradient that SPSA/ES
estimate is the same ``sum_t e_t h_t^T``. The proxy of sample ``j`` and group ``g`` sums, over the
group's linears,

    T_j ~ (sum_t |e_t|^2) * (sum_t (|h_t|^2 + 1))

with the errors ``e`` exact: the clean pass records the graph from the first perturbed linear on and
differentiates the loss back to each linear's output (a backward through the layers above the group only,
for ``B`` clean samples, once per step; nothing below the group, no parameter gradients). Only relative
values matter to an allocator; a proxy from ``dL/dlogits`` alone would miss the back-propagated LayerNorm
scaling of the blocks above the group (``jobs/bench_allocation.py`` compares it with the oracle). The proxy uses the clean pass only, never a query's
noise, so allocating from it keeps the estimate unbiased. A model with a ``token_mask(x)`` (a causal LM's pads)
has its masked tokens left out of the input norms, as LR leaves them out of its terms.
"""

from __future__ import annotations

import torch
from torch import nn

from flops_ray.models.groups import ResolvedGroup
from flops_ray.models.losses import LossFn, model_outputs


def clean_pass(
    model: nn.Module, groups: list[ResolvedGroup], x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean losses ``(n,)``, embeddings ``(n, D)`` and trace proxies ``(n, G)`` of the rows ``x``, ``y``.

    A group without linears, or a loss autograd cannot differentiate, gets NaN proxies (allocators then
    fall back to the trace memory).
    """
    outputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (group, output y (n, T, d), input norms (n,))

    unbatched: set[int] = set()
    counted = model.token_mask(x) if hasattr(model, "token_mask") else None  # (n, T) tokens whose terms count

    def make_hook(g: int, bias: bool):
        def hook(module, inputs, out):
            h = inputs[0].detach()
            if h.shape[0] != len(x):
                unbatched.add(g)  # rows are not samples here: no per-sample proxy for this group
                return out
            h = h.reshape(h.shape[0], -1, h.shape[-1]).double()  # (n, T, C_in)
            tokens = h.shape[1] if counted is None else counted.sum(1)
            if counted is not None:
                h = torch.where(counted[..., None], h, 0)
            if not out.requires_grad:
                # The graph starts at the first perturbed linear: nothing below it is recorded.
                out = out.detach().requires_grad_(True)
            outputs.append((g, out, (h**2).sum((1, 2)) + (tokens if bias else 0)))
            # A copy goes on, so an in-place op downstream leaves the recorded output intact.
            return out.clone()

        return hook

    handles = [
        lin.register_forward_hook(make_hook(g, lin.bias is not None))
        for g, group in enumerate(groups)
        for _, lin in group.linears
    ]
    proxy = torch.full((len(x), len(groups)), float("nan"), dtype=torch.float64, device=x.device)
    try:
        with torch.enable_grad():
            logits, emb = model_outputs(model, x)
            losses = loss_fn(logits, y)
            if outputs and losses.requires_grad:
                errors = torch.autograd.grad(losses.sum(), [o for _, o, _ in outputs], allow_unused=True)
                proxy[:, sorted({g for g, _, _ in outputs})] = 0.0
                for (g, _, norms), e in zip(outputs, errors):
                    if e is not None:
                        proxy[:, g] += (e.double() ** 2).flatten(1).sum(1) * norms
                proxy[:, sorted(unbatched)] = float("nan")
    finally:
        for handle in handles:
            handle.remove()
    return losses.detach(), emb.detach(), proxy
