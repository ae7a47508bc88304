"""Where a run's metrics go besides ``metrics.parquet``: TensorBoard, MLflow and W&B (``job.loggers``).

Every logger receives each metrics row's scalars (:func:`~flops_ray.training.metrics_log.scalars`) at the row's
step, the config as hyper-parameters when a run starts, and the run's files (checkpoint, summary) when it ends.
A resumed run continues the same logger run: the TensorBoard folder (events from the resumed step on replace the
earlier ones), the MLflow run id and the W&B run id, which ``OUT/tracking.json`` keeps.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from flops_ray.config import JobConfig
from flops_ray.training.tracking import missing_extra


class RunLogger(Protocol):
    """One destination of a run's metrics."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Log one metrics row's scalars at ``step``."""

    def close(self, files: list[Path], ok: bool) -> None:
        """End the run: keep ``files`` (checkpoint, summary) where the logger keeps artifacts; ``ok`` False marks a
        run that failed or stopped early."""


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str | float | int | bool]:
    """A nested config as ``dotted.key -> value`` (lists by index: ``groups.0.sigma``), the keys ``--set`` takes.

    >>> flat_params({"lr": 0.1, "groups": [{"sigma": 0.01}], "data": {"dataset": "digits"}})
    {'lr': 0.1, 'groups.0.sigma': 0.01, 'data.dataset': 'digits'}
    """
    out: dict[str, str | float | int | bool] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (isinstance(value, list | tuple) and value and isinstance(value[0], dict)):
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""The package each logger imports."""


def require_packages(names: tuple[str, ...]) -> None:
    """Check that every listed logger's package is installed.

    Raises:
        ImportError: naming the extra to install.
    """
    for name in names:
        if name in PACKAGES:
            try:
                importlib.import_module(PACKAGES[name])
            except ImportError as exc:
                raise missing_extra(name, exc) from exc


class Loggers:
    """The run's loggers, opened from ``job.loggers`` (parquet is the metrics log itself, not one of these).

    Args:
        job: the run settings (``loggers``, ``tracking_uri``, ``experiment``).
        out: the run's output directory.
        config: the training config as plain data (the hyper-parameters).
        resume_step: the step a resumed run continues at (None: a new run, which starts new logger runs).

    Raises:
        ImportError: a listed logger's package is missing (the message names the extra to install).
    """

    def __init__(self, job: JobConfig, out: Path, config: dict[str, Any], resume_step: int | None = None):
        params = flat_params(config)
        self.loggers: list[RunLogger] = []
        try:
            for name in dict.fromkeys(job.loggers):
                if name != "parquet":
                    self.loggers.append(_OPENERS[name](job, out, params, resume_step))
        except BaseException:
            self.close([], ok=False)
            raise

    def log(self, scalars: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(scalars, step)

    def close(self, files: list[Path], ok: bool) -> None:
        """Close every logger, each even when another fails; raises the first failure."""
        errors = []
        for logger in self.loggers:
            try:
                logger.close([f for f in files if f.is_file()], ok)
            except Exception as exc:
                errors.append(exc)
        self.loggers = []
        if errors:
            raise errors[0]


def _tensorboard(job: JobConfig, out: Path, params: dict, resume_step: int | None) -> RunLogger:
    from flops_ray.training.tensorboard_log import TensorBoardLog

    return TensorBoardLog(out / "tensorboard", params, resume_step)


def _mlflow(job: JobConfig, out: Path, params: dict, resume_step: int | None) -> RunLogger:
    from flops_ray.training.mlflow_log import MlflowLog

    return MlflowLog(out, job.tracking_uri, job.experiment, params, resume_step)


def _wandb(job: JobConfig, out: Path, params: dict, resume_step: int | None) -> RunLogger:
    from flops_ray.training.wandb_log import WandbLog

    return WandbLog(out, job.experiment, params, resume_step)


_OPENERS: dict[str, Callable[[JobConfig, Path, dict, int | None], RunLogger]] = {
    "tensorboard": _tensorboard,
    "mlflow": _mlflow,
    "wandb": _wandb,
}
"""Each logger's opener (its package is imported only when a run lists it)."""
