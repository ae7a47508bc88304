"""The TensorBoard logger: scalars as event files in ``OUT/tensorboard``, the config as hyper-parameters.

A new run purges the folder's earlier events (``purge_step=0``); a resumed run purges those from its resumed
step on, so the folder reads as one run without the steps an interrupted run logged after its last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from flops_ray.training.tracking import missing_extra


class TensorBoardLog:
    """Scalars of every metrics row at its step, in the event files of ``folder``.

    Args:
        folder: the run's TensorBoard folder.
        params: the config as ``dotted.key -> value``.
        resume_step: the step a resumed run continues at (None: a new run).
    """

    def __init__(self, folder: Path, params: dict, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as exc:
            raise missing_extra("tensorboard", exc) from exc
        self.writer = SummaryWriter(str(folder), purge_step=resume_step or 0)
        if resume_step is None:
            for summary in hparams(params, {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self, files: list[Path], ok: bool) -> None:
        self.writer.close()
