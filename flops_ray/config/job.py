"""Settings of a run that do not change the maths: the ``job:`` section of a config."""

from __future__ import annotations

from dataclasses import dataclass

from flops_ray.config.validation import require


@dataclass(frozen=True)
class JobConfig:
    """Settings of a run that do not change the maths: the ``job:`` section of a config YAML."""

    out: str = ""
    """Output directory when ``--out`` is not given (empty: ``runs/<config file stem>``)."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0: only by time, at the end, and on a stop or an error).
    Each save replaces the last atomically."""
    checkpoint_minutes: float = 5.0
    """Also save a checkpoint when this many minutes have passed since the last one (0: never by time)."""
    log_every: int = 10
    """Print a progress line every this many steps."""
    flush_every: int = 50
    """Metrics rows per Parquet row group."""

    def validate(self) -> JobConfig:
        """Check the fields; returns self."""
        require(self.checkpoint_every >= 0, "job.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.checkpoint_minutes >= 0, "job.checkpoint_minutes", f"must be >= 0, got {self.checkpoint_minutes}")
        require(self.log_every >= 1, "job.log_every", f"must be >= 1, got {self.log_every}")
        require(self.flush_every >= 1, "job.flush_every", f"must be >= 1, got {self.flush_every}")
        return self
