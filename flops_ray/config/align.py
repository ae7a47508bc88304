"""The ``align:`` section of an alignment job's config: the frozen vision encoder, the visual tokens and the methods.

The rest of the config is a training config: ``model`` names the frozen causal LM, ``data`` the captioned images,
``groups`` the adapter (its ``sigma`` and queries per sample are OPS-LR's), and the estimator, allocator, farm and
optimizer are those of the first method, OPS-LR (paper section 5.3, appendix C.3).

>>> AlignSettings(methods=("ops_lr", "bp")).validate().visual_tokens
1
>>> AlignSettings(methods=("adam",)).validate()
Traceback (most recent call last):
...
flops_ray.config.validation.ConfigError: align.methods: unknown method 'adam'; known: ops_lr, lr, spsa, bp
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flops_ray.config.validation import require

METHODS = ("ops_lr", "lr", "spsa", "bp")
"""OPS-LR (the config's estimator and allocator), LR with equal allocation, SPSA on the adapter's weights with
equal allocation, and backprop through the LM."""
STANDIN = "standin"
"""``encoder``, ``model`` and ``data.dataset`` naming the stand-in the job makes from the seed (no download)."""


@dataclass(frozen=True)
class AlignSettings:
    """What an alignment run adds to a training config."""

    encoder: str = STANDIN
    """The frozen vision encoder: ``hf:<repo id or directory>`` a CLIP vision tower (``hf:openai/clip-vit-large-patch14``),
    a timm model name, or ``standin``."""
    encoder_pretrained: bool = True
    """A timm encoder's hub weights (through the Hugging Face cache); a ``hf:`` encoder always has its own."""
    image_size: int = 0
    """Side the images are decoded to (0: the encoder's input side); the encoder resizes what it gets."""
    visual_tokens: int = 1
    """``k``, visual tokens the adapter makes from an image's CLS feature (the paper: 1)."""
    instruction: str = ""
    """Text after the visual tokens and before the caption (context, not scored)."""
    methods: tuple[str, ...] = METHODS
    """Methods run one after another, each from the same initial adapter (:data:`METHODS`)."""
    spsa_sigma: float = 1e-3
    """SPSA's perturbation scale on the adapter's weights (the group's ``sigma`` is LR's, on its output)."""
    target_loss: float = 0.1
    """Figure 5's mark: a method's wall time to reach it is the whole steps' seconds up to the first step whose
    training caption loss is at or below it."""
    generate: int = 4
    """Test images greedily captioned after alignment, beside the captions of the initial (random) adapter."""
    max_caption_tokens: int = 32
    """Longest generated caption, in tokens."""

    def validate(self) -> AlignSettings:
        """Check every field; returns self so calls chain."""
        require(bool(self.encoder.strip()), "align.encoder", "must name a vision encoder")
        require(self.image_size >= 0, "align.image_size", f"must be >= 0 (0: the encoder's), got {self.image_size}")
        require(self.visual_tokens >= 1, "align.visual_tokens", f"must be >= 1, got {self.visual_tokens}")
        require(bool(self.methods), "align.methods", f"name at least one of {', '.join(METHODS)}")
        for method in self.methods:
            require(method in METHODS, "align.methods", f"unknown method {method!r}; known: {', '.join(METHODS)}")
        require(
            len(set(self.methods)) == len(self.methods), "align.methods", f"a method is named twice: {self.methods}"
        )
        require(
            math.isfinite(self.spsa_sigma) and self.spsa_sigma > 0,
            "align.spsa_sigma",
            f"must be > 0, got {self.spsa_sigma}",
        )
        require(self.target_loss > 0, "align.target_loss", f"must be > 0, got {self.target_loss}")
        require(self.generate >= 0, "align.generate", f"must be >= 0, got {self.generate}")
        require(
            self.max_caption_tokens >= 1, "align.max_caption_tokens", f"must be >= 1, got {self.max_caption_tokens}"
        )
        return self
