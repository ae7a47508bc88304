"""Settings of a run that do not change the maths: the ``job:`` section of a config."""

from __future__ import annotations

from dataclasses import dataclass

from flops_ray.config.validation import require

LOGGERS = ("parquet", "tensorboard", "mlflow", "wandb")
"""Where a run's metrics can go (``job.loggers``); each but parquet is an optional extra of the same name."""


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
    loggers: tuple[str, ...] = ("parquet",)
    """Where every metrics row also goes, at the same step: any of ``parquet``, ``tensorboard`` (event files in
    ``OUT/tensorboard``), ``mlflow`` (``job.tracking_uri``), ``wandb`` (offline in ``OUT/wandb`` unless
    ``WANDB_MODE`` says otherwise). ``OUT/metrics.parquet`` is written whatever the list: plots and resumes read it."""
    tracking_uri: str = ""
    """MLflow tracking URI (empty: ``MLFLOW_TRACKING_URI``, else a file store in ``OUT/mlruns``)."""
    experiment: str = "flops_ray"
    """MLflow experiment and W&B project the run is logged under."""
    noise_warning_steps: int = 5
    """Print a warning when a group's gradient estimate has been noise (``snr`` below 2) for this many measured
    steps in a row (``estimator.telemetry_every`` apart; 0: never)."""

    def validate(self) -> JobConfig:
        """Check the fields; returns self."""
        require(self.checkpoint_every >= 0, "job.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.checkpoint_minutes >= 0, "job.checkpoint_minutes", f"must be >= 0, got {self.checkpoint_minutes}")
        require(self.log_every >= 1, "job.log_every", f"must be >= 1, got {self.log_every}")
        require(self.flush_every >= 1, "job.flush_every", f"must be >= 1, got {self.flush_every}")
        unknown = sorted(set(self.loggers) - set(LOGGERS))
        require(not unknown, "job.loggers", f"unknown {unknown}; known loggers are {list(LOGGERS)}")
        require(
            self.noise_warning_steps >= 0, "job.noise_warning_steps", f"must be >= 0, got {self.noise_warning_steps}"
        )
        return self
