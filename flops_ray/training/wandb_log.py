"""The Weights & Biases logger: offline by default, in ``OUT/wandb`` (``wandb sync`` uploads it later).

``WANDB_MODE`` in the environment overrides the mode (``online`` logs to the server as the run goes). The run
id goes in ``OUT/tracking.json``: a resumed run continues it (``resume="allow"``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from flops_ray.training.tracking import missing_extra, read_tracking, record_tracking


class WandbLog:
    """One W&B run of a training run.

    Args:
        out: the run's output directory.
        project: the W&B project.
        params: the config as ``dotted.key -> value``.
        resume_step: the step a resumed run continues at (None: a new run).
    """

    def __init__(self, out: Path, project: str, params: dict, resume_step: int | None):
        try:
            import wandb
        except ImportError as exc:
            raise missing_extra("wandb", exc) from exc
        self.wandb = wandb
        known = read_tracking(out).get("wandb", {})
        run_id = known["run_id"] if resume_step is not None and "run_id" in known else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=project,
            id=run_id,
            name=out.name,
            dir=str(out),
            config=params,
            mode=os.environ.get("WANDB_MODE", "offline"),
            resume="allow",
        )
        record_tracking(out, "wandb", {"run_id": run_id, "dir": str(Path(self.run.dir).parent)})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, files: list[Path], ok: bool) -> None:
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.finish(exit_code=0 if ok else 1)
