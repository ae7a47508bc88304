"""Layer groups: which modules a query perturbs, its noise scale and budget (the ``groups:`` section)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flops_ray.config.validation import require


@dataclass(frozen=True)
class GroupConfig:
    """One layer group: a query perturbs exactly one group (docs/DESIGN.md section 1)."""

    name: str
    """Label used in logs and metrics."""
    modules: tuple[str, ...]
    """fnmatch patterns over ``model.named_modules()`` names, e.g. ``("blocks.0.*",)``.
    LR perturbs the outputs of the matched ``nn.Linear`` modules; SPSA/ES perturb their parameters."""
    sigma: float
    """Noise scale of this group's perturbations (> 0)."""
    queries_per_sample: int
    """Mean queries per data point for this group; the group's step budget is this times the batch."""

    def validate(self, prefix: str = "groups") -> None:
        where = f"{prefix}[{self.name}]"
        require(bool(self.name), f"{where}.name", "must be a non-empty string")
        require(len(self.modules) > 0, f"{where}.modules", "empty layer group (no module patterns)")
        require(math.isfinite(self.sigma) and self.sigma > 0, f"{where}.sigma", f"must be > 0, got {self.sigma}")
        require(
            self.queries_per_sample > 0 and self.queries_per_sample % 2 == 0,
            f"{where}.queries_per_sample",
            f"must be a positive even number (antithetic pairs), got {self.queries_per_sample}",
        )


def default_groups() -> tuple[GroupConfig, ...]:
    """Layer groups of the default digits ViT: the last MLP output projection, then the head.

    LR's variance grows with the number of outputs a query perturbs; on a 4-block ViT at 16 queries
    per sample, one linear per group is what keeps the estimate's cosine to backprop useful (see
    ``jobs/bench_estimator.py``). The paper's groups of several blocks suit larger budgets.
    """
    return (
        GroupConfig("top", ("blocks.3.mlp.fc2",), sigma=0.05, queries_per_sample=16),
        GroupConfig("head", ("head",), sigma=0.1, queries_per_sample=16),
    )
