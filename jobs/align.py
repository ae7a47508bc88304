"""Multimodal alignment forward-only (paper section 5.3, Figure 5): train the linear adapter between a frozen vision
encoder and a frozen causal LM with OPS-LR, LR, SPSA and backprop, from the same initial adapter.

By default everything is the stand-in (``encoder``, ``model`` and ``data.dataset`` set to ``standin``): captioned
shape images, a CLIP vision tower and a GPT-2 pretrained by backprop, written to ``OUT/standin`` from the seed
(:mod:`flops_ray.studies.align_standin`) and loaded back through ``hf:`` as the paper's models are. Writes
``OUT/align.json``: per method the training losses, the median whole-step wall time, the peak memory of a step's
work (measured in a fresh process per method), the test caption loss before and after, and greedy captions of a few
test images beside the random adapter's; and the allocator's seconds per OPS-LR step.

    python jobs/align.py --quick --out runs/align_quick
    python jobs/align.py --out runs/align --seed 1
    ray job submit --working-dir . -- python jobs/align.py --config jobs/configs/align_clip_vicuna.yaml --out runs/align
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

from flops_ray.app.align import align, build_aligner, caption_data, load_align_config
from flops_ray.app.errors import add_debug_option, run_main
from flops_ray.app.job_config import jobs_dir
from flops_ray.config import TrainConfig
from flops_ray.config.align import STANDIN, AlignSettings
from flops_ray.config.plain import config_to_dict, plain
from flops_ray.files import write_text
from flops_ray.studies.align_standin import AlignStandinSettings, make_align_standin
from flops_ray.studies.peak_memory import in_fresh_process

DEFAULT_CONFIG = jobs_dir() / "configs" / "align_standin.yaml"
"""OPS-LR, LR, SPSA and backprop on the stand-in, the forward-only methods on a Ray farm of 2 replicas."""
RESOLVED = "align_config.yaml"
"""The config as run (the stand-in's paths in place of ``standin``), written to the output folder."""
QUICK_STANDIN = dataclasses.replace(
    AlignStandinSettings(train_size=64, test_size=16, encoder_steps=10),
    lm=dataclasses.replace(AlignStandinSettings().lm, pretrain_sentences=200, pretrain_steps=10),
)
"""A smaller stand-in for ``--quick``: a plumbing check does not need one that learned anything."""


def quick(settings: AlignSettings, cfg: TrainConfig) -> tuple[AlignSettings, TrainConfig]:
    """A plumbing check: 3 steps of 8 samples, 4 queries per sample, 2 generated captions."""
    groups = tuple(dataclasses.replace(g, queries_per_sample=4) for g in cfg.groups)
    return dataclasses.replace(settings, generate=2, max_caption_tokens=8), cfg.replace(
        steps=3, batch_size=8, eval_every=3, groups=groups, farm=dataclasses.replace(cfg.farm, shard_cost=8)
    )


def with_standin(
    settings: AlignSettings, cfg: TrainConfig, out: Path, small: bool
) -> tuple[AlignSettings, TrainConfig]:
    """The names ``standin`` replaced by the stand-in written to ``out/standin`` from the root seed (written only
    where the config names it)."""
    if STANDIN not in (settings.encoder, cfg.model, cfg.data.dataset):
        return settings, cfg
    paths = make_align_standin(out / "standin", cfg.seed, QUICK_STANDIN if small else AlignStandinSettings())
    print(f"wrote the stand-in encoder, LM and captioned images for seed {cfg.seed} to {paths.root}", flush=True)
    if settings.encoder == STANDIN:
        settings = dataclasses.replace(settings, encoder=f"hf:{paths.encoder}")
    data = cfg.data
    if data.dataset == STANDIN:
        data = dataclasses.replace(data, dataset=str(paths.train), test_dataset=str(paths.test))
    return settings, cfg.replace(model=f"hf:{paths.lm}" if cfg.model == STANDIN else cfg.model, data=data)


def peak(method: str, config: Path) -> int:
    """Peak bytes of ``method``'s step work on the run of ``config`` (a resolved config), in a fresh process."""
    return in_fresh_process([str(Path(__file__).resolve()), "--peak", method, "--config", str(config)])["bytes"]


def measure_peak(method: str, config: Path) -> None:
    """The ``--peak`` child: print ``{"bytes": ...}`` as its last line."""
    from flops_ray.studies.align_peak import step_peak_bytes

    settings, cfg = load_align_config(config)
    model, tokenizer = build_aligner(settings, cfg)
    data = caption_data(settings, cfg, model, tokenizer)
    print(json.dumps({"bytes": step_peak_bytes(method, cfg, settings, model, data)}))


def main(settings: AlignSettings, cfg: TrainConfig, out: Path, small: bool = False) -> dict[str, Any]:
    """Align with every method of ``settings`` into ``out``; returns what ``align.json`` holds."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings, cfg = with_standin(settings, cfg, out, small)
    config = out / RESOLVED
    write_text(config, yaml.safe_dump({"align": plain(settings), **config_to_dict(cfg)}, sort_keys=False))
    model, tokenizer = build_aligner(settings, cfg)
    data = caption_data(settings, cfg, model, tokenizer)
    print(f"{len(data.train)} training and {len(data.test)} test captions; adapter {model.adapter}", flush=True)
    result = align(settings, cfg, model, data, tokenizer)
    for method, figures in result["methods"].items():
        figures["peak_bytes"] = peak(method, config)
    if {"lr", "bp"} <= result["methods"].keys():
        result["lr_peak_vs_bp"] = result["methods"]["lr"]["peak_bytes"] / result["methods"]["bp"]["peak_bytes"]
    result.update(seed=cfg.seed, quick=small, seconds=time.perf_counter() - t0, config=str(config))
    for method, figures in result["methods"].items():
        reached = figures["seconds_to_target"]
        print(
            f"{method:6s} test loss {figures['test_loss_before']:.3f} -> {figures['test_loss_after']:.3f}  "
            f"{figures['step_seconds']:.3f} s/step  "
            f"to loss {settings.target_loss}: {f'{reached:.1f} s' if reached is not None else 'not reached'}  "
            f"peak {figures['peak_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
    for i, reference in enumerate(result["captions"]["reference"]):
        print(f"test image {i}: {reference!r}", flush=True)
        for who, said in result["captions"].items():
            if who != "reference":
                print(f"  {who:14s} {said[i]!r}", flush=True)
    write_text(out / "align.json", json.dumps(result, indent=2) + "\n")
    print(f"done in {result['seconds']:.0f} s -> {out / 'align.json'}", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config YAML (default: the stand-in's)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "align", help="output directory")
    parser.add_argument("--seed", type=int, default=None, help="root seed of the run and of the stand-in")
    parser.add_argument("--quick", action="store_true", help="a plumbing check: tiny stand-in, 3 steps per method")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training field")
    parser.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # internal: one method's peak, see peak()
    return add_debug_option(parser)


def run(args: argparse.Namespace) -> object:
    """The job as its command line asks: a whole alignment run, or (internal) one method's peak memory."""
    if args.peak:
        return measure_peak(args.peak, args.config)
    settings, cfg = load_align_config(args.config, ([f"seed={args.seed}"] if args.seed is not None else []) + args.set)
    if args.quick:
        settings, cfg = quick(settings, cfg)
    return main(settings, cfg, args.out, args.quick)


if __name__ == "__main__":
    run_main(build_parser(), run)
