"""How one query's loss becomes a gradient term: the ``estimator:`` section of a config."""

from __future__ import annotations

from dataclasses import dataclass

from flops_ray.config.validation import require

PRECISIONS = ("float32", "bfloat16", "float16")
NOISE_LAWS = ("gaussian", "rank1")


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
    telemetry_every: int = 10
    """Every this many steps the main queries also return their per-sample trace estimates, for that step's
    gradient-quality telemetry (``snr``, ``realised_variance_ratio``: :class:`~flops_ray.step.interface.StepReport`;
    0: never). The gradient is the same either way; a measured step costs more (docs/RESULTS.md, telemetry)."""
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

    def validate(self) -> None:
        require(self.floor >= 2 and self.floor % 2 == 0, "estimator.floor", f"must be even and >= 2, got {self.floor}")
        require(
            self.pilot_queries >= 0 and self.pilot_queries % 2 == 0,
            "estimator.pilot_queries",
            f"must be even and >= 0, got {self.pilot_queries}",
        )
        require(self.trace_coords >= 1, "estimator.trace_coords", f"must be >= 1, got {self.trace_coords}")
        require(self.telemetry_every >= 0, "estimator.telemetry_every", f"must be >= 0, got {self.telemetry_every}")
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
