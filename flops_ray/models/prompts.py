"""Visual prompts for a frozen timm ViT, as a black-box loss over prompt vectors (paper section 5.2).

>>> import torch
>>> from flops_ray.models.factory import digits_vit
>>> model = PromptedViT(digits_vit(), tokens=2)
>>> model(torch.zeros(3, 2 * 64), torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)).shape
torch.Size([3])
"""

from __future__ import annotations

import torch
from torch import nn

from flops_ray.data.arrays import ArrayDataset


class PromptedViT(nn.Module):
    """A frozen ViT whose prompt tokens are its input: a batched black-box loss over prompt vectors.

    ``forward(prompts (R, T*E), x (R, 1, 8, 8), y (R,)) -> (R,)`` cross entropy of each row under its prompt.
    """

    def __init__(self, vit: nn.Module, tokens: int):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.tokens = tokens

    def logits(self, prompts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(R, T*E), (R, ...) -> (R, K)``: prompts go after the class token, before the patch tokens."""
        vit = self.vit
        t = vit._pos_embed(vit.patch_embed(x))  # (R, 1 + N, E)
        p = prompts.view(len(x), self.tokens, t.shape[-1])
        t = torch.cat([t[:, :1], p.to(t.dtype), t[:, 1:]], dim=1)
        return vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(t))))

    def forward(self, prompts: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(prompts, x), y, reduction="none")

    @torch.no_grad()
    def accuracy(self, prompt: torch.Tensor, data: ArrayDataset) -> float:
        x = torch.from_numpy(data.x)
        pred = self.logits(prompt.expand(len(x), -1), x).argmax(-1).numpy()
        return float((pred == data.y).mean())
