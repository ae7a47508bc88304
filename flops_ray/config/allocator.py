"""How a group's budget is split over a batch: the ``allocator:`` section of a config."""

from __future__ import annotations

from dataclasses import dataclass

from flops_ray.config.validation import require

SIGNALS = ("clean", "memory", "pilot")


@dataclass(frozen=True)
class AllocatorConfig:
    """How a group's per-step budget is split over the batch (paper section 4)."""

    kind: str = "neyman"
    """``equal``, ``bernoulli`` (eq. 6), ``gaussian`` (eq. 5, fitted by eqs. 9-11) or ``neyman``
    (closed-form optimum ``A_j ~ sqrt(T_j)``); the registered allocators of :mod:`flops_ray.allocation.allocators`.
    The default, Neyman from the clean-pass proxy, matched or beat the oracle's error ratio at
    every checkpoint of ``jobs/bench_allocation.py`` (docs/RESULTS.md)."""
    bernoulli_p: float = 0.5
    """Bernoulli: probability that a below-mean-loss sample is cut to half its queries."""
    gaussian_draws: int = 32
    """Gaussian: allocations ``K`` drawn per likelihood-ratio gradient (eq. 11)."""
    gaussian_iters: int = 25
    """Gaussian: Adam iterations on ``lambda`` per training step (warm-started from the last step)."""
    gaussian_lr: float = 0.05
    """Gaussian: Adam learning rate on ``lambda`` (in units of the mean allocation)."""
    signal: str = "clean"
    """Where ``T_j`` comes from for the allocators that read traces (gaussian, neyman): ``clean`` (a proxy
    computed from the clean pass, no extra queries; black boxes have none and use the memory), ``memory``
    (per-sample estimates from every query of earlier visits) or ``pilot`` (this step's pilot queries,
    which a trace-reading allocation then does not reuse). Each keeps the estimate unbiased
    (docs/DESIGN.md section 3)."""
    joint: bool = False
    """Neyman over (group, sample) cells: one budget per step (the groups' budgets summed) split in proportion to
    ``sqrt(T_gj)``, with the floor per cell. Under LR on the clean signal, the proxies times each group's noise
    width (its linears' output width); otherwise each group's signal scaled to the level of its measured traces
    in the trace memory (earlier steps only), and a step before the memory holds every group keeps the groups'
    own budgets. Needs ``kind: neyman`` (docs/DESIGN.md section 3)."""
    memory_decay: float = 0.5
    """Trace memory: weight old evidence keeps at each new visit of a sample (traces drift as the model learns)."""
    memory_prior: float = 4.0
    """Trace memory: shrinkage toward the batch mean, in degrees of freedom (a sample seen little is trusted little)."""

    def validate(self) -> None:
        require(0.0 <= self.bernoulli_p <= 1.0, "allocator.bernoulli_p", f"must be in [0, 1], got {self.bernoulli_p}")
        require(self.gaussian_draws >= 2, "allocator.gaussian_draws", f"must be >= 2, got {self.gaussian_draws}")
        require(self.gaussian_iters >= 0, "allocator.gaussian_iters", f"must be >= 0, got {self.gaussian_iters}")
        require(self.gaussian_lr > 0, "allocator.gaussian_lr", f"must be > 0, got {self.gaussian_lr}")
        require(self.signal in SIGNALS, "allocator.signal", f"must be one of {SIGNALS}, got {self.signal!r}")
        require(not self.joint or self.kind == "neyman", "allocator.joint", f"needs kind neyman, got {self.kind!r}")
        require(0 <= self.memory_decay <= 1, "allocator.memory_decay", f"must be in [0, 1], got {self.memory_decay}")
        require(self.memory_prior > 0, "allocator.memory_prior", f"must be > 0, got {self.memory_prior}")
