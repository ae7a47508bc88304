"""A black box for the farm benchmark: per-sample losses of a frozen ViT whose head each query row sets, and the
machine's limit it is measured against (plain batched inference of the same ViT)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flops_ray.models.losses import cross_entropy
from flops_ray.studies.timing import single_threaded


class FrozenHead(nn.Module):
    """Per-sample losses of the frozen ViT ``vit`` with row ``r``'s head set to ``thetas[r]``.

    ``thetas (R, K*C + K)`` hold each row's head weight ``(K, C)`` and bias ``(K,)``; every row costs one
    forward of the ViT's body, so rows/s is sample-forwards/s.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit.requires_grad_(False).eval()

    def forward(self, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)  # (R, C)
        k, c = self.vit.head.weight.shape
        logits = torch.einsum("rc,rkc->rk", feats, thetas[:, : k * c].view(-1, k, c)) + thetas[:, k * c :]
        return cross_entropy(logits, y)

    def initial(self) -> torch.Tensor:
        """The ViT's own head as one ``(K*C + K,)`` vector: where a search starts."""
        return torch.cat([self.vit.head.weight.detach().flatten(), self.vit.head.bias.detach()])


def limit_rows_per_s(vit: nn.Module, x: np.ndarray, rows: int, batches: tuple[int, ...]) -> float:
    """The best single-thread batched inference rate of ``vit`` (rows/s) over ``batches``: the limit a black box
    of it is measured against, each batch size timed over ``rows`` rows (at least one batch) of ``x`` repeated (a
    rate over a burst of a few milliseconds would be the luckiest burst, not a rate)."""
    data = torch.from_numpy(x).repeat(max(batches) // len(x) + 1, 1, 1, 1)
    best = 0.0
    for batch in batches:
        chunk, calls = data[:batch], max(1, round(rows / batch))
        with torch.inference_mode():
            vit(chunk)  # warm-up
            best = max(best, batch * calls / single_threaded(lambda c=chunk, n=calls: [vit(c) for _ in range(n)]))
    return best
