"""Black-box prompt tuning (paper section 5.2): visual prompt tokens for a frozen ViT that answers only losses.

The frozen model is a digits ViT pretrained by backprop to *follow a prompt*: two learned prompts select
between two labellings of the same images (the digit, or the digit shifted by 5 mod 10). The first prompt
ships with the model as its default; the second is thrown away. The black-box task is to find a prompt that
makes the frozen model do the second labelling again, seeing only per-sample losses: the visual analogue of
black-box prompt tuning of a language model, where the model can do the task and a prompt must elicit it.
The default prompt scores near 0 on the task (it answers the other labelling), so there is a lot to fix.

The search runs in a random subspace, ``p = p_default + z W`` with ``W (d, T*E)`` fixed, by ES on the farm,
once with the fitted Gaussian allocator (OPS) and once with equal allocation at the same budget.
Writes ``OUT/prompt_tuning.json`` (``accuracy``, ``frozen_accuracy``, ``accuracy_by_allocator``, curves).

    python jobs/prompt_tuning.py --quick --out runs/prompt_quick
    ray job submit --working-dir . -- python jobs/prompt_tuning.py --out runs/prompt_tuning
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flops_ray.blackbox import BlackBox
from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, TrainConfig, require
from flops_ray.data import ArrayDataset, digits
from flops_ray.models import digits_vit
from flops_ray.prompts import PromptedViT
from flops_ray.seeding import STREAM_INIT, derive_seed
from flops_ray.step import StepReport
from flops_ray.trainer import Trainer


@dataclass(frozen=True)
class PromptConfig:
    """The prompt-tuning run."""

    prompt_tokens: int = 2
    """Prompt tokens inserted after the class token (``T``)."""
    pretrain_steps: int = 600
    """Backprop steps teaching the frozen model to follow its two prompts (~15 s on 2 cores)."""
    subspace: int = 32
    """Dimension ``d`` of the searched vector ``z``."""
    steps: int = 100
    """Black-box optimizer steps per allocator."""
    batch_size: int = 32
    """Data points per step (``B``)."""
    queries_per_sample: int = 8
    """Mean queries per data point (the allocators split ``B`` times this)."""
    sigma: float = 0.05
    """ES perturbation scale in ``z``."""
    lr: float = 0.02
    """Adam learning rate on ``z``."""
    allocators: tuple[str, ...] = ("gaussian", "equal")
    """The first is the headline ``accuracy`` (OPS); the others are compared with it."""
    backend: str = "ray"
    """``ray`` (the query farm on a local or joined Ray) or ``local`` (in-process)."""
    workers: int = 2
    """Replica actors of the farm (``backend = ray``)."""
    eval_every: int = 10
    """Test accuracy every this many steps (and after the last)."""
    seed: int = 0
    """Root seed of the pretraining, the projection, the batches and every query's noise."""

    def __post_init__(self):
        for name in ("steps", "eval_every", "batch_size", "queries_per_sample", "workers"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


QUICK = PromptConfig(pretrain_steps=60, steps=4, batch_size=16, queries_per_sample=4, eval_every=2)

SHIFT = 5
"""The hidden task's labelling: ``(digit + SHIFT) mod 10``."""


def shifted(data: ArrayDataset) -> ArrayDataset:
    """The hidden task: the same images, labelled ``(digit + SHIFT) mod 10``."""
    return ArrayDataset(data.x, (data.y + SHIFT) % 10)


def pretrain_prompt_follower(cfg: PromptConfig) -> tuple[PromptedViT, torch.Tensor]:
    """Backprop-train a digits ViT and two prompts, one per labelling; return the frozen model and the default prompt."""
    torch.manual_seed(derive_seed(cfg.seed, STREAM_INIT))
    model = PromptedViT(digits_vit(num_classes=10), cfg.prompt_tokens)
    model.vit.requires_grad_(True).train()
    prompts = nn.Parameter(0.02 * torch.randn(2, cfg.prompt_tokens * model.vit.embed_dim))
    train = digits("train")
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    opt = torch.optim.AdamW([*model.vit.parameters(), prompts], lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, STREAM_INIT, 3))
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(len(y), (64,), generator=gen)
        task = torch.randint(2, (64,), generator=gen)
        loss = model(prompts[task], x[idx], (y[idx] + SHIFT * task) % 10).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.vit.requires_grad_(False).eval()
    return model, prompts[0].detach().clone()


def tune(cfg: PromptConfig, model: PromptedViT, default: torch.Tensor, allocator: str) -> dict:
    """Black-box ES over ``z`` with one allocator; returns the accuracy curve and final accuracy."""
    train, test = shifted(digits("train")), shifted(digits("test"))
    box = BlackBox(model, default, subspace=cfg.subspace, seed=derive_seed(cfg.seed, STREAM_INIT, 4))
    train_cfg = TrainConfig(
        groups=(BlackBox.group(cfg.sigma, cfg.queries_per_sample, name="prompt"),),
        estimator=EstimatorConfig(kind="es"),
        allocator=AllocatorConfig(kind=allocator),
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        lr=cfg.lr,
        seed=cfg.seed,
        farm=FarmConfig(backend=cfg.backend, workers=cfg.workers),
    )
    curve, t0 = [], time.perf_counter()

    def record(trainer: Trainer, report: StepReport) -> None:
        # The box answers losses only: accuracy is the frozen model's under the tuned prompt.
        if trainer.step_count % cfg.eval_every == 0 or trainer.step_count == cfg.steps:
            acc = model.accuracy(box.theta(), test)
            curve.append({"step": trainer.step_count, "loss": report.loss, "accuracy": acc})
            print(
                f"{allocator:9s} step {trainer.step_count:>4}/{cfg.steps}  loss {report.loss:.3f}  acc {acc:.3f}",
                flush=True,
            )

    with Trainer(train_cfg, box, train) as trainer:
        trainer.fit(hooks=[record])
    return {
        "accuracy": curve[-1]["accuracy"],
        # The mean over the curve tells allocators apart by how fast they get there, not only where.
        "mean_curve_accuracy": float(np.mean([c["accuracy"] for c in curve])),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def main(cfg: PromptConfig, out: str | Path) -> dict:
    """Pretrain the prompt follower, then tune the hidden task's prompt with each allocator."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, default = pretrain_prompt_follower(cfg)
    test = digits("test")
    frozen = model.accuracy(default, shifted(test))
    print(
        f"frozen model: {model.accuracy(default, test):.3f} on its own task, {frozen:.3f} on the hidden one", flush=True
    )
    runs = {kind: tune(cfg, model, default, kind) for kind in cfg.allocators}
    result = {
        "accuracy": runs[cfg.allocators[0]]["accuracy"],
        "frozen_accuracy": frozen,
        "default_task_accuracy": model.accuracy(default, test),
        "accuracy_by_allocator": {k: r["accuracy"] for k, r in runs.items()},
        "mean_curve_accuracy_by_allocator": {k: r["mean_curve_accuracy"] for k, r in runs.items()},
        "runs": runs,
        "config": dataclasses.asdict(cfg),
    }
    (out / "prompt_tuning.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"accuracy {result['accuracy_by_allocator']} (frozen {frozen:.3f}) -> {out / 'prompt_tuning.json'}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny run for tests (a few steps, brief pretraining)")
    parser.add_argument("--out", default="runs/prompt_tuning", help="output directory (default: runs/prompt_tuning)")
    parser.add_argument("--backend", choices=("ray", "local"), default=None, help="where queries run (default: ray)")
    parser.add_argument("--steps", type=int, default=None, help="black-box steps per allocator")
    args = parser.parse_args()
    cfg = QUICK if args.quick else PromptConfig()
    overrides = {k: v for k, v in (("backend", args.backend), ("steps", args.steps)) if v is not None}
    main(dataclasses.replace(cfg, **overrides), args.out)
