"""The parameter update a replica applies to its own copy: clip per group, then the optimizer step.

Every replica holds the trainable parameters and the optimizer state and applies the same update to the
same gradient, so the copies stay identical without parameters ever travelling; a digest of the copy lets
the driver compare replicas without moving them.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3))
>>> upd = ParamUpdate([[w]], UpdateRule("sgd", lr=0.5, grad_clip=0.0, momentum=0.0))
>>> upd.apply([torch.tensor([1.0, 2.0, 2.0])])
[3.0]
>>> w.detach().tolist()
[0.5, 0.0, 0.0]
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from flops_ray.config import UpdateRule


def make_optimizer(rule: UpdateRule, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``rule`` names over ``params``."""
    if rule.optimizer == "adam":
        return torch.optim.Adam(params, lr=rule.lr)
    return torch.optim.SGD(params, lr=rule.lr, momentum=rule.momentum)


def clip_norm(grad: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]:
    """``grad`` scaled to L2 norm at most ``max_norm`` (0: unchanged), and its norm before clipping."""
    norm = float(grad.double().norm())
    if max_norm > 0 and norm > max_norm:
        grad = grad * (max_norm / norm)
    return grad, norm


def digest(params: list[torch.Tensor]) -> str:
    """A hash of the parameters' bytes: equal copies give equal digests (one host copy per tensor)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class ParamUpdate:
    """The optimizer over a replica's trainable parameters, grouped as the layer groups are.

    Args:
        groups: per layer group, its parameters in flat order.
        rule: optimizer and clipping.
    """

    def __init__(self, groups: list[list[nn.Parameter]], rule: UpdateRule):
        self.groups = groups
        self.params = [p for g in groups for p in g]
        self.rule = rule
        self.optimizer = make_optimizer(rule, self.params)

    def apply(self, grads: list[torch.Tensor]) -> list[float]:
        """Clip each group's ``(P_g,)`` gradient estimate and take one optimizer step; returns the norms before
        clipping (float64 reductions, so every replica computes the same ones)."""
        norms = []
        for params, grad in zip(self.groups, grads):
            grad, norm = clip_norm(grad, self.rule.grad_clip)
            norms.append(norm)
            offset = 0
            for p in params:
                p.grad = grad[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype).clone()
                offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    def digest(self) -> str:
        return digest(self.params)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
