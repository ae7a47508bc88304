"""Typed, frozen configuration for forward-only training.

Every field carries a docstring; ``validate()`` raises :class:`ConfigError` naming the field
that is wrong, so a bad YAML fails before any forward pass is spent.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flops_ray.config.data import DataConfig
from flops_ray.config.farm import FarmConfig
from flops_ray.config.validation import ConfigError, require

__all__ = [
    "OPTIMIZERS",
    "SIGNALS",
    "AllocatorConfig",
    "ConfigError",
    "DataConfig",
    "EstimatorConfig",
    "FarmConfig",
    "GroupConfig",
    "TrainConfig",
    "default_groups",
    "least_queries",
    "require",
    "reuses_pilot",
]

SIGNALS = ("clean", "memory", "pilot")
OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("float32", "bfloat16", "float16")
NOISE_LAWS = ("gaussian", "rank1")


def _registered(kind: str) -> tuple[str, ...]:
    """Names in the estimator or allocator registry (imported here: the registries import this module)."""
    if kind == "estimator":
        from flops_ray.estimators import ESTIMATORS

        return tuple(sorted(ESTIMATORS))
    from flops_ray.allocation.allocators import ALLOCATORS

    return tuple(sorted(ALLOCATORS))


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


@dataclass(frozen=True)
class EstimatorConfig:
    """How one query's loss becomes a gradient term (paper eqs. 1-3)."""

    kind: str = "lr"
    """``lr`` (perturb module outputs), ``spsa`` (two-sided parameter) or ``es`` (one-sided parameter with
    clean-loss baseline); the registered families of :mod:`flops_ray.estimators`."""
    antithetic: bool = True
    """LR only: use ``(+eps, -eps)`` pairs; if False, LR subtracts the clean loss (one-sided baseline).
    SPSA is always antithetic and ES never is."""
    pilot_queries: int = 0
    """Every sample's first queries (counted in the budget). With ``allocator.signal = pilot`` a trace-reading
    allocator reads their traces: they run first, in their own round (a barrier), and need two independent
    draws (4 queries for antithetic pairs). One that allocates from them (neyman) does not reuse them in the
    estimate; one that only fits on them (gaussian) does, and its main round runs them again (the replicas
    keep nothing in between: ``B x pilot`` more forwards per group). Otherwise nothing reads them: they are
    each sample's first queries, run with the others, and only set the fewest queries a sample gets. MeZO is
    SPSA with a budget of 2 and equal allocation."""
    floor: int = 2
    """Fewest queries any sample gets (even, >= 2)."""
    trace_coords: int = 512
    """Coordinates sub-sampled per group to estimate ``T_j = Tr Cov[G]``."""
    max_rows: int = 256
    """Most perturbed rows in one batched forward on a replica (memory bound, not a semantic knob): a replica
    holds one such chunk's noise and activations, whatever the shard's size (LR: the group's linears' inputs
    and outputs per row; SPSA/ES: about three ``P_g``-sized float32 vectors per row)."""
    on_nonfinite: str = "raise"
    """A query whose loss is NaN or inf (or a black-box call that raises): ``raise`` stops the step with an
    error naming the shard and sample; ``skip`` drops the query (it contributes 0, which shrinks that
    sample's estimate by the dropped fraction) and counts it in the step's ``skipped``. A raising black-box
    call drops all its rows (up to ``max_rows`` queries). The clean pass and a wrong output shape always
    raise."""
    precision: str = "float32"
    """Forward passes on the replicas: ``float32``, or under ``torch.autocast`` in ``bfloat16`` / ``float16``
    (less memory traffic on GPUs; parameters, noise and gradient sums stay float32/float64)."""
    noise: str = "gaussian"
    """SPSA/ES: a draw's law. ``gaussian``: independent normals per parameter (the paper's); ``rank1``: each
    weight matrix's noise is ``u v^T`` with normal ``u``, ``v`` (same ``E[eps eps^T] = I``, unbiased; SPSA's
    variance about ``2/m + 2/n`` higher for an ``m x n`` matrix), ``m + n`` normals instead of ``mn`` per
    draw, and a replica replays a step's gradient as one matmul per matrix. LR perturbs outputs: always
    ``gaussian``."""
    share_prefix: bool = True
    """Run the blocks before a group's first block once per sample, not once per query (the block's input fans
    out to the sample's queries; checked exact on a replica's first chunk, else off): a query of a top group
    costs well under a plain forward. Off: every query runs the whole model."""

    @property
    def paired(self) -> bool:
        """Whether queries come in antithetic pairs sharing one noise draw."""
        return self.kind == "spsa" or (self.kind == "lr" and self.antithetic)

    @property
    def unit(self) -> int:
        """Queries per independent noise draw (2 for antithetic pairs)."""
        return 2 if self.paired else 1

    def validate(self) -> None:
        kinds = _registered("estimator")
        require(self.kind in kinds, "estimator.kind", f"must be one of {kinds}, got {self.kind!r}")
        require(self.floor >= 2 and self.floor % 2 == 0, "estimator.floor", f"must be even and >= 2, got {self.floor}")
        require(
            self.pilot_queries >= 0 and self.pilot_queries % 2 == 0,
            "estimator.pilot_queries",
            f"must be even and >= 0, got {self.pilot_queries}",
        )
        require(self.trace_coords >= 1, "estimator.trace_coords", f"must be >= 1, got {self.trace_coords}")
        require(self.max_rows >= 2, "estimator.max_rows", f"must be >= 2, got {self.max_rows}")
        require(
            self.precision in PRECISIONS,
            "estimator.precision",
            f"must be one of {PRECISIONS}, got {self.precision!r}",
        )
        require(self.noise in NOISE_LAWS, "estimator.noise", f"must be one of {NOISE_LAWS}, got {self.noise!r}")
        require(
            self.on_nonfinite in ("raise", "skip"),
            "estimator.on_nonfinite",
            f"must be 'raise' or 'skip', got {self.on_nonfinite!r}",
        )


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
    memory_decay: float = 0.5
    """Trace memory: weight old evidence keeps at each new visit of a sample (traces drift as the model learns)."""
    memory_prior: float = 4.0
    """Trace memory: shrinkage toward the batch mean, in degrees of freedom (a sample seen little is trusted little)."""

    def validate(self) -> None:
        kinds = _registered("allocator")
        require(self.kind in kinds, "allocator.kind", f"must be one of {kinds}, got {self.kind!r}")
        require(0.0 <= self.bernoulli_p <= 1.0, "allocator.bernoulli_p", f"must be in [0, 1], got {self.bernoulli_p}")
        require(self.gaussian_draws >= 2, "allocator.gaussian_draws", f"must be >= 2, got {self.gaussian_draws}")
        require(self.gaussian_iters >= 0, "allocator.gaussian_iters", f"must be >= 0, got {self.gaussian_iters}")
        require(self.gaussian_lr > 0, "allocator.gaussian_lr", f"must be > 0, got {self.gaussian_lr}")
        require(self.signal in SIGNALS, "allocator.signal", f"must be one of {SIGNALS}, got {self.signal!r}")
        require(0 <= self.memory_decay <= 1, "allocator.memory_decay", f"must be in [0, 1], got {self.memory_decay}")
        require(self.memory_prior > 0, "allocator.memory_prior", f"must be > 0, got {self.memory_prior}")


def reuses_pilot(estimator: EstimatorConfig, allocator: AllocatorConfig) -> bool:
    """Whether the pilot's queries enter the estimate.

    Not when a trace-reading allocation is computed from them: counts chosen from the pilot's draws would
    weight those same draws, which biases the estimate (docs/DESIGN.md section 3).
    """
    from flops_ray.allocation.allocators import ALLOCATORS

    chosen_by_pilot = allocator.signal == "pilot" and ALLOCATORS[allocator.kind].allocates_from_traces
    return estimator.pilot_queries > 0 and not chosen_by_pilot


def reads_pilot(estimator: EstimatorConfig, allocator: AllocatorConfig) -> bool:
    """Whether a step reads its pilot's traces (to allocate, or to fit the allocator): only then does the pilot
    run as a round of its own, before the allocation."""
    from flops_ray.allocation.allocators import ALLOCATORS

    return estimator.pilot_queries > 0 and allocator.signal == "pilot" and ALLOCATORS[allocator.kind].needs_traces


def least_queries(estimator: EstimatorConfig, allocator: AllocatorConfig) -> int:
    """Fewest queries any sample may be given: the floor, and a pilot plus one draw when the pilot is not reused."""
    pilot = estimator.pilot_queries
    if pilot and not reuses_pilot(estimator, allocator):
        return max(estimator.floor, pilot + estimator.unit)
    return max(estimator.floor, pilot)


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


@dataclass(frozen=True)
class UpdateRule:
    """How gradient estimates become parameter updates (the ``optimizer``, ``lr`` and ``grad_clip`` of a run)."""

    optimizer: str = "adam"
    """``adam`` or ``sgd`` (with ``momentum``)."""
    lr: float = 2e-3
    """Learning rate."""
    grad_clip: float = 1.0
    """Largest L2 norm of a group's gradient estimate; larger ones are scaled down (0: no clipping)."""
    momentum: float = 0.9
    """``sgd`` only."""


@dataclass(frozen=True)
class TrainConfig:
    """A whole forward-only training run. One root ``seed`` determines everything."""

    model: str = "digits_vit_pretrained"
    """Model name in the flops_ray registry (``digits_vit``, ``digits_vit_pretrained``) or any timm model name."""
    pretrained: str = ""
    """Path of a local weights file (safetensors or torch state dict) loaded into the model; no hub access."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset."""
    groups: tuple[GroupConfig, ...] = field(default_factory=default_groups)
    """Layer groups; each query perturbs one group."""
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    """Gradient estimator."""
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    """Query allocator."""
    farm: FarmConfig = field(default_factory=FarmConfig)
    """Execution backend."""
    backprop: bool = False
    """Train the groups' parameters by backprop instead: the baseline every estimator is compared to
    (no queries; the estimator, allocator and farm settings are unused)."""
    batch_size: int = 32
    """Data points per step (``B``)."""
    steps: int = 300
    """Optimizer steps."""
    optimizer: str = "adam"
    """``adam`` or ``sgd``."""
    lr: float = 2e-3
    """Learning rate."""
    grad_clip: float = 1.0
    """Clip each group's estimated gradient to this norm (paper recommends clipping attention); 0 disables."""
    seed: int = 0
    """Root seed: noise, data order, initial weights and allocator draws all derive from it."""
    eval_every: int = 50
    """Evaluate test accuracy every this many steps (0: only at the end)."""

    def validate(self) -> TrainConfig:
        """Check every field; returns self so calls chain."""
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be > 0, got {self.lr}")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        require(len(self.groups) > 0, "groups", "at least one layer group is needed")
        names = [g.name for g in self.groups]
        require(len(set(names)) == len(names), "groups", f"group names must be unique, got {names}")
        self.data.validate()
        self.estimator.validate()
        self.allocator.validate()
        self.farm.validate()
        require(
            self.farm.reduction != "scalar" or self.estimator.kind != "lr",
            "farm.reduction",
            "scalar needs an SPSA or ES estimator (an LR term depends on activations, not only on its seed)",
        )
        for g in self.groups:
            g.validate()
        if not self.backprop:
            self._check_budgets()
        return self

    def _check_budgets(self) -> None:
        from flops_ray.allocation.allocators import ALLOCATORS

        allocator, est = ALLOCATORS[self.allocator.kind], self.estimator
        if self.allocator.signal == "pilot" and allocator.needs_traces:
            draws = 2 * est.unit
            require(
                est.pilot_queries >= draws,
                "estimator.pilot_queries",
                f"{self.allocator.kind} allocation from the pilot (allocator.signal=pilot) reads trace estimates, "
                f"which need >= 2 independent draws ({draws} queries for {est.kind}), got {est.pilot_queries}",
            )
        minimum = least_queries(est, self.allocator)
        for g in self.groups:
            require(
                g.queries_per_sample >= minimum,
                f"groups[{g.name}].queries_per_sample",
                f"budget {g.queries_per_sample}x{self.batch_size} is below the floor {minimum}x{self.batch_size} "
                "(estimator.floor, or the pilot plus one more draw when the pilot is not reused)",
            )

    @property
    def update_rule(self) -> UpdateRule:
        """How every replica turns a gradient estimate into a step of its own copy of the parameters."""
        return UpdateRule(self.optimizer, self.lr, self.grad_clip)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)
