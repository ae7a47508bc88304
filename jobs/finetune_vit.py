"""Forward-only fine-tuning of a (timm) ViT with optimal query allocation: the main job.

Writes OUT/summary.json (test accuracy and training loss before and after, steps, queries, wall time, config),
OUT/metrics.parquet, OUT/checkpoint.safetensors and PNG plots. The logic lives in ``flops_ray.app.run.train`` (also behind
``flops-ray train``); this script only parses options.

    python jobs/finetune_vit.py --quick --out runs/quick
    python jobs/finetune_vit.py --config jobs/configs/digits_ops_spsa.yaml --set steps=100
    ray job submit --working-dir . -- python jobs/finetune_vit.py --config jobs/configs/digits_ops_lr.yaml --out runs/digits_ops_lr
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flops_ray.app import run
from flops_ray.app.errors import add_debug_option, run_main
from flops_ray.app.job_config import add_train_arguments, train_run
from flops_ray.config import JobConfig, TrainConfig


def main(
    cfg: TrainConfig, out: str | Path, quick: bool = False, job: JobConfig | None = None, resume: bool = False
) -> dict[str, Any]:
    """Train ``cfg`` into ``out`` (``quick``: a tiny run for tests); returns the summary."""
    return run.train(cfg, out, job, quick=quick, resume=resume)


def build_parser() -> argparse.ArgumentParser:
    """The job's options: those of ``flops-ray train``, with the same default config."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    return add_debug_option(parser)


def _main(args: argparse.Namespace) -> None:
    cfg, job, out = train_run(args)
    main(cfg, out, args.quick, job, args.resume)


if __name__ == "__main__":
    run_main(build_parser(), _main)
