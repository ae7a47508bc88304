"""Black-box prompt tuning of a CLIP (paper section 5.2, appendix C.2, Table 2): OPS-LR, OPS-SPSA, LR, SPSA and
the manual prompt on three classification datasets.

The CLIP is frozen and seen only through a loss function of prompts (the black box,
:class:`~flops_ray.models.clip_prompts.CLIPPromptLoss`): a 12-token text prefix prompt after the text's BOS and a
10-token image suffix prompt after the patches, ``p = z W`` with a fixed block Gaussian ``W`` (``d_T + d_I``
searched numbers). The loss function ships to the farm's replicas once, inside the box; each call evaluates
many prompts at once. ``model: hf:standin`` (the default) pretrains a small CLIP contrastively on captioned
synthetic images into ``OUT/standin`` (no download), loads it back with ``from_pretrained`` as a hub model would
be, and tunes on three of its tasks (digits, places, low_res_places); ``hf:openai/clip-vit-base-patch32`` with Parquet
datasets is the paper's setting (jobs/configs/vlm/clip_b32_paper.yaml).

Writes ``OUT/vlm_prompt_tuning.json``: ``{"rows": {method: {dataset: {"mean", "sd", "seeds"}}}, ...}`` with the
methods ``ops_lr``, ``ops_spsa``, ``lr``, ``spsa`` and ``manual`` (test accuracy; ``seeds``: one per seed).

    python jobs/vlm_prompt_tuning.py --quick --out runs/vlm_quick
    python jobs/vlm_prompt_tuning.py --config jobs/configs/vlm/standin.yaml --out runs/vlm_prompt_tuning --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from flops_ray import Trainer
from flops_ray.data.standin_clip import StandinCLIPSettings, make_standin_clip, preprocess, task_split
from flops_ray.farm.ray_init import ray_session
from flops_ray.files import write_text
from flops_ray.models.clip_prompts import load_clip
from flops_ray.studies.job_cli import job_parser
from flops_ray.studies.vlm_prompts import (
    Task,
    VLMPromptConfig,
    accuracy,
    farm_config,
    initial_prompts,
    load_vlm_config,
    manual_accuracy,
    parquet_task,
    prompt_box,
    prompt_loss,
    train_config,
)

RESULTS = "vlm_prompt_tuning.json"
STANDIN = "hf:standin"
QUICK = {"standin_steps": 20, "epochs": 1, "queries_per_sample": 4, "batch_size": 16, "shots": 2, "test_size": 32}
"""A plumbing check: a barely pretrained stand-in, one pass over 2 shots per class, 4 queries per sample."""


def load_model(cfg: VLMPromptConfig, out: Path):
    """The CLIP, its tokenizer and image processor: the stand-in is pretrained into ``out/standin`` first (reused
    when it is there), then loaded by the same ``from_pretrained`` path a hub model takes."""
    source = cfg.model
    if source == STANDIN:
        folder = out / "standin"
        if not (folder / "config.json").is_file():
            t0 = time.perf_counter()
            settings = StandinCLIPSettings(pretrain_steps=cfg.standin_steps)
            make_standin_clip(folder, cfg.standin_seed, settings)
            print(
                f"stand-in CLIP: {cfg.standin_steps} contrastive steps in {time.perf_counter() - t0:.1f} s", flush=True
            )
        source = f"hf:{folder}"
    return load_clip(source)


def load_task(cfg: VLMPromptConfig, spec, processor) -> Task:
    """A dataset of the config, preprocessed by the model's image processor."""
    from flops_ray.data.arrays import ArrayDataset
    from flops_ray.data.standin_clip import class_names

    if spec.train:
        return parquet_task(spec, cfg.shots, processor, cfg.standin_seed)
    (xtr, ytr), (xte, yte) = task_split(spec.name, cfg.shots, cfg.test_size, cfg.standin_seed)
    return Task(
        spec.name,
        class_names(spec.name),
        ArrayDataset(preprocess(processor, xtr).numpy(), ytr),
        ArrayDataset(preprocess(processor, xte).numpy(), yte),
    )


def tune(cfg: VLMPromptConfig, loss, p0, task: Task, method: str, seed: int) -> dict:
    """One tuned row on one dataset and seed: the test accuracy of the prompts after ``cfg.epochs`` passes."""
    t0 = time.perf_counter()
    train_cfg = train_config(cfg, method, len(task.train), seed)
    steps = train_cfg.steps
    with Trainer(train_cfg, prompt_box(cfg, loss, p0, seed), task.train) as trainer:
        reports = trainer.fit()
        theta = trainer.model.theta()
    acc = accuracy(loss, theta, task.test, cfg.eval_batch)
    seconds = time.perf_counter() - t0
    print(
        f"{task.name:8s} {method:8s} seed {seed}: {steps} steps, loss {reports[0].loss:.3f} -> {reports[-1].loss:.3f}, "
        f"test accuracy {acc:.3f} ({seconds:.0f} s)",
        flush=True,
    )
    return {"accuracy": acc, "first_loss": reports[0].loss, "last_loss": reports[-1].loss, "seconds": seconds}


def summarise(per_seed: dict[str, dict[str, list[float]]]) -> dict:
    """``{method: {dataset: {"mean", "sd", "seeds"}}}`` (``sd``: sample standard deviation over seeds, 0 for one)."""
    return {
        method: {
            name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "seeds": v}
            for name, v in by_task.items()
        }
        for method, by_task in per_seed.items()
    }


def tune_dataset(cfg: VLMPromptConfig, spec, model, seeds: tuple[int, ...], rows: dict, runs: list, start: dict):
    """The manual prompt and every method and seed on one dataset; adds to ``rows``, ``runs`` and ``start``."""
    clip, tokenizer, processor = model
    task = load_task(cfg, spec, processor)
    loss = prompt_loss(cfg, clip, tokenizer, task.classes)
    manual = manual_accuracy(cfg, loss, tokenizer, task)
    p0 = initial_prompts(cfg, loss, tokenizer, task.train)
    start[task.name] = accuracy(loss, p0, task.test, cfg.eval_batch)
    print(f"{task.name:8s} p0       : test accuracy {start[task.name]:.3f} (prompt_init {cfg.prompt_init})")
    print(f"{task.name:8s} manual   : test accuracy {manual:.3f} ({len(task.train)} shots, {len(task.test)} test)")
    rows["manual"][task.name] = [manual] * len(seeds)  # no search: the same on every seed
    for method in cfg.methods:
        for seed in seeds:
            run = tune(cfg, loss, p0, task, method, seed)
            rows[method].setdefault(task.name, []).append(run["accuracy"])
            runs.append({"dataset": task.name, "method": method, "seed": seed, **run})


def main(cfg: VLMPromptConfig, out: str | Path, seeds: tuple[int, ...], quick: bool = False) -> dict:
    """Every method on every dataset for every seed; writes ``out/vlm_prompt_tuning.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if quick:
        print(
            "--quick is a plumbing check: a barely pretrained stand-in and one short pass; its accuracies mean nothing"
        )
    clip, tokenizer, processor = load_model(cfg, out)
    rows: dict[str, dict[str, list[float]]] = {m: {} for m in ("manual", *cfg.methods)}
    runs, start = [], {}
    # One Ray for every run: each run's farm starts its replicas on it instead of starting Ray anew.
    with ray_session(farm_config(cfg)) if cfg.backend == "ray" else contextlib.nullcontext():
        for spec in cfg.datasets:
            tune_dataset(cfg, spec, (clip, tokenizer, processor), seeds, rows, runs, start)
    result = {
        "rows": summarise(rows),
        "seeds": list(seeds),
        "start_accuracy": start,
        "quick": quick,
        "seconds": time.perf_counter() - t0,
        "runs": runs,
        "config": dataclasses.asdict(cfg),
    }
    write_text(out / RESULTS, json.dumps(result, indent=2))
    print(f"done in {result['seconds']:.0f} s -> {out / RESULTS}")
    return result


def parser() -> argparse.ArgumentParser:
    """The job's command line (the configs' headers are checked against it)."""
    out = job_parser(__doc__, "vlm_prompt_tuning", "a plumbing check: tiny stand-in, one short pass per method")
    out.add_argument("--config", default=None, help="a YAML of VLMPromptConfig fields (default: the defaults)")
    out.add_argument("--seeds", type=int, nargs="+", default=[0], help="tuning seeds (default: 0)")
    out.add_argument("--backend", choices=("ray", "local"), default=None, help="where queries run (default: ray)")
    return out


if __name__ == "__main__":
    args = parser().parse_args()
    cfg = VLMPromptConfig() if args.config is None else load_vlm_config(args.config)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if args.backend:
        cfg = dataclasses.replace(cfg, backend=args.backend)
    main(cfg, args.out, tuple(args.seeds), args.quick)
