"""Forward-only fine-tuning of a Hugging Face causal LM on prompt-completion text with optimal query allocation.

By default the model is the stand-in (``model: hf:standin``, ``data.dataset: standin``): a small GPT-2 and a
two-choice topic task it does at chance zero-shot, written to ``OUT/standin`` from the seed
(:func:`flops_ray.data.standin_lm.make_standin`) and trained from ``hf:OUT/standin/model`` on
``OUT/standin/train.jsonl`` (test split: the sibling ``test.jsonl``). A config naming a real model
(``hf:facebook/opt-1.3b``) and a JSONL file trains those instead. Writes what ``jobs/finetune_vit.py`` writes:
OUT/summary.json (test accuracy and training loss before and after, ...), metrics, checkpoint and plots.

    python jobs/finetune_lm.py --quick --out runs/lm_quick
    python jobs/finetune_lm.py --out runs/standin_lm_ops_lr --seed 1
    ray job submit --working-dir . -- python jobs/finetune_lm.py --config jobs/configs/opt_1_3b_sst2_mezo.yaml --out runs/opt
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from flops_ray.app import run
from flops_ray.app.errors import add_debug_option, run_main
from flops_ray.app.job_config import JobConfig, add_train_arguments, jobs_dir, train_run
from flops_ray.config import TrainConfig
from flops_ray.data.standin_lm import StandinSettings, make_standin

STANDIN_MODEL = "hf:standin"
"""``model`` naming the stand-in LM this job writes under ``OUT/standin``."""
STANDIN_DATA = "standin"
"""``data.dataset`` naming the stand-in's training split."""
DEFAULT_CONFIG = jobs_dir() / "configs" / "standin_lm_ops_lr.yaml"
"""The job's config when ``--config`` is not given: OPS-LR on the stand-in, on a Ray farm of 2 replicas."""
QUICK_STANDIN = StandinSettings(train_size=128, test_size=64, pretrain_sentences=512, pretrain_steps=60)
"""A smaller stand-in for ``--quick``: a smoke run does not need one that learned the text."""


def with_standin(cfg: TrainConfig, out: Path, quick: bool = False) -> TrainConfig:
    """``cfg`` with the stand-in's names replaced by the files :func:`make_standin` writes to ``out/standin`` from
    ``cfg.seed`` (written only where ``cfg`` names the stand-in)."""
    if cfg.model != STANDIN_MODEL and cfg.data.dataset != STANDIN_DATA:
        return cfg
    paths = make_standin(out / "standin", cfg.seed, QUICK_STANDIN if quick else StandinSettings())
    print(f"wrote the stand-in LM and its task for seed {cfg.seed} to {paths.root}", flush=True)
    model = f"hf:{paths.model}" if cfg.model == STANDIN_MODEL else cfg.model
    data = cfg.data
    if data.dataset == STANDIN_DATA:
        # The test split is the sibling test.jsonl, unless the config names one.
        data = dataclasses.replace(data, dataset=str(paths.train))
    return cfg.replace(model=model, data=data)


def main(
    cfg: TrainConfig, out: str | Path, quick: bool = False, job: JobConfig | None = None, resume: bool = False
) -> dict[str, Any]:
    """Train ``cfg`` (the stand-in written first where it names it) into ``out``; returns the summary."""
    out = Path(out)
    return run.train(with_standin(cfg, out, quick), out, job, quick=quick, resume=resume)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``flops-ray train`` with this job's default config, plus ``--seed``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser, default_config=DEFAULT_CONFIG)
    parser.add_argument(
        "--seed", type=int, default=None, help="root seed of the run and of the stand-in (default: the config's seed)"
    )
    return add_debug_option(parser)


def _main(args: argparse.Namespace) -> None:
    # --seed is a --set that comes first, so an explicit --set seed=... still wins as the later one.
    args.set = ([f"seed={args.seed}"] if args.seed is not None else []) + args.set
    cfg, job, out = train_run(args)
    main(cfg, out, args.quick, job, args.resume)


if __name__ == "__main__":
    run_main(build_parser(), _main)
