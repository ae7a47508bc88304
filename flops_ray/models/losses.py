"""Per-sample losses and model outputs shared by the estimators, the trainer and the jobs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Per-sample loss ``(outputs (R, ...), targets (R,)) -> (R,)``."""


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross entropy, ``(R, C), (R,) -> (R,)``."""
    return nn.functional.cross_entropy(logits, targets, reduction="none")


def completion_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of a scorer of candidates (:class:`~flops_ray.models.causal_lm.CausalLMScorer`): minus the
    true candidate's score, ``(R, C), (R,) -> (R,)`` (a causal LM's mean cross entropy of the completion)."""
    return -scores.gather(1, targets.long()[:, None])[:, 0]


def model_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and a per-sample embedding (timm pre-logits / CLS token; the logits for other models)."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        feats = model.forward_features(x)
        return model.forward_head(feats), model.forward_head(feats, pre_logits=True)
    logits = model(x)
    return logits, logits
