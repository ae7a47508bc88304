"""Forward-only LoRA: ``peft`` low-rank adapters on a Hugging Face causal LM, trained as its layer groups.

>>> LoraSettings(rank=4).validate().alpha
16.0
>>> LoraSettings(rank=-1).validate()
Traceback (most recent call last):
...
flops_ray.config.validation.ConfigError: lora.rank: must be >= 0 (0: no adapters), got -1
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flops_ray.config.validation import require


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (``peft``) on a causal LM (``model: hf:...``); with ``rank`` > 0 the default groups become
    the adapters' ``lora_A``/``lora_B`` linears and the base weights are never changed."""

    rank: int = 0
    """Rank ``r`` of every adapter; 0: no adapters (the LM's own linears are the groups)."""
    alpha: float = 16.0
    """``lora_alpha``: an adapter's output is scaled by ``alpha / rank``."""
    targets: tuple[str, ...] = ()
    """Module names (relative to the LM, no ``lm.`` prefix) or name suffixes (``mlp.c_proj``) to adapt;
    empty: the LM's default group modules (its last block's MLP and attention output projections)."""

    @property
    def on(self) -> bool:
        """Whether adapters are added."""
        return self.rank > 0

    def validate(self) -> LoraSettings:
        """Check every field; returns self so calls chain."""
        require(
            isinstance(self.rank, int) and self.rank >= 0,
            "lora.rank",
            f"must be >= 0 (0: no adapters), got {self.rank}",
        )
        require(math.isfinite(self.alpha) and self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        for i, target in enumerate(self.targets):
            require(
                isinstance(target, str) and bool(target.strip()) and not target.startswith("lm."),
                f"lora.targets[{i}]",
                f"must be a module name relative to the LM (no 'lm.' prefix), got {target!r}",
            )
        return self
