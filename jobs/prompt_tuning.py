"""Black-box prompt tuning (paper section 5.2): visual prompt tokens for a frozen ViT that answers only losses.

The frozen model is a digits ViT pretrained by backprop to *follow a prompt*: two learned prompts select
between two labellings of the same images (the digit, or the digit shifted by 5 mod 10). The first prompt
ships with the model as its default; the second is thrown away. The black-box task is to find a prompt that
makes the frozen model do the second labelling again, seeing only per-sample losses: the visual analogue of
black-box prompt tuning of a language model, where the model can do the task and a prompt must elicit it.

The job checks that premise before tuning: the pretraining runs until the model follows each prompt on
held-out data (accuracy >= ``follow_threshold`` on each labelling) and fails naming the figures if it does
not within ``pretrain_max_steps``. The default prompt then scores near 0 on the hidden labelling (it answers
the other one), so there is a lot to fix.

The search runs in a random subspace, ``p = p_default + z W`` with ``W (d, T*E)`` fixed, by ES on the farm,
once with the fitted Gaussian allocator (OPS) and once with equal allocation at the same budget.
Writes ``OUT/summary.json`` (``initial_accuracy``: the frozen model's, ``accuracy``: the tuned prompt's with
the first allocator, ``accuracy_by_allocator``, the premise's figures, curves).

    python jobs/prompt_tuning.py --quick --out runs/prompt_quick
    python jobs/prompt_tuning.py --out runs/prompt_tuning --seed 0
    ray job submit --working-dir . -- python jobs/prompt_tuning.py --out runs/prompt_tuning
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from flops_ray import AllocatorConfig, BlackBox, EstimatorConfig, FarmConfig, StepReport, TrainConfig, Trainer, digits
from flops_ray.app.run import SUMMARY, first_and_last_loss, write_summary
from flops_ray.models.prompts import PromptedViT
from flops_ray.studies.job_cli import job_parser, run_main
from flops_ray.studies.prompt_follower import (
    PromptConfig,
    follow_matrix,
    pretrain_prompt_follower,
    prompt_box,
    shifted,
)

QUICK = PromptConfig(
    follow_threshold=0.0,
    pretrain_check_every=60,
    pretrain_max_steps=60,
    steps=4,
    batch_size=16,
    queries_per_sample=4,
    eval_every=2,
)
"""A plumbing check: 60 pretraining steps, the premise not required (threshold 0), 4 tuning steps."""


def tune(cfg: PromptConfig, model: PromptedViT, default: torch.Tensor, allocator: str) -> dict:
    """Black-box ES over ``z`` with one allocator; returns the accuracy curve, the final accuracy and the training
    loss of the first and the last step."""
    train, test = shifted(digits("train")), shifted(digits("test"))
    box = prompt_box(cfg, model, default)
    train_cfg = TrainConfig(
        groups=(BlackBox.group(cfg.sigma, cfg.queries_per_sample, name="prompt"),),
        estimator=EstimatorConfig(kind="es"),
        allocator=AllocatorConfig(kind=allocator),
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        lr=cfg.lr,
        seed=cfg.seed,
        farm=FarmConfig(backend=cfg.backend, replicas=cfg.replicas),
    )
    curve, t0 = [], time.perf_counter()

    def record(trainer: Trainer, report: StepReport) -> None:
        # The box answers losses only: accuracy is the frozen model's under the tuned prompt.
        if trainer.step_count % cfg.eval_every == 0 or trainer.step_count == cfg.steps:
            # trainer.model: the box with the replicas' current parameters (they own them during the run).
            acc = model.accuracy(trainer.model.theta(), test)
            curve.append({"step": trainer.step_count, "loss": report.loss, "accuracy": acc})
            print(
                f"{allocator:9s} step {trainer.step_count:>4}/{cfg.steps}  loss {report.loss:.3f}  acc {acc:.3f}",
                flush=True,
            )

    with Trainer(train_cfg, box, train) as trainer:
        initial_loss, loss = first_and_last_loss(trainer.fit(hooks=[record]))
    return {
        "accuracy": curve[-1]["accuracy"],
        "initial_loss": initial_loss,
        "loss": loss,
        # The mean over the curve tells allocators apart by how fast they get there, not only where.
        "mean_curve_accuracy": float(np.mean([c["accuracy"] for c in curve])),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def main(cfg: PromptConfig, out: str | Path, quick: bool = False) -> dict:
    """Pretrain the prompt follower to its premise, then tune the hidden task's prompt with each allocator.

    Raises:
        PremiseError: the pretraining bound was hit before the model followed both prompts.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if quick:
        print(
            f"--quick is a plumbing check: {cfg.pretrain_max_steps} pretraining steps with the premise not required, "
            f"{cfg.steps} tuning steps; its accuracies mean nothing",
            flush=True,
        )
    model, prompts, premise = pretrain_prompt_follower(cfg)
    premise["test"] = follow_matrix(model, prompts, digits("test"))
    (own, frozen), _ = premise["test"]
    print(
        f"premise: {premise['pretrain_steps']} pretraining steps; on test the default prompt gets {own:.3f} on its "
        f"own labelling and {frozen:.3f} on the hidden one, the lost prompt {premise['test'][1][1]:.3f} on it",
        flush=True,
    )
    runs = {kind: tune(cfg, model, prompts[0], kind) for kind in cfg.allocators}
    headline = runs[cfg.allocators[0]]
    result = write_summary(
        out,
        frozen,
        headline["accuracy"],
        headline["initial_loss"],
        headline["loss"],
        frozen_accuracy=frozen,
        gain=headline["accuracy"] - frozen,
        default_task_accuracy=own,
        lost_prompt_accuracy=premise["test"][1][1],
        accuracy_by_allocator={k: r["accuracy"] for k, r in runs.items()},
        mean_curve_accuracy_by_allocator={k: r["mean_curve_accuracy"] for k, r in runs.items()},
        premise=premise,
        quick=quick,
        seconds=time.perf_counter() - t0,
        runs=runs,
        config=dataclasses.asdict(cfg),
    )
    print(f"accuracy {result['accuracy_by_allocator']} (frozen {frozen:.3f}) -> {out / SUMMARY}")
    return result


if __name__ == "__main__":
    parser = job_parser(__doc__, "prompt_tuning", "a plumbing check: brief pretraining, no premise, 4 steps")
    parser.add_argument("--backend", choices=("ray", "local"), default=None, help="where queries run (default: ray)")
    parser.add_argument("--steps", type=int, default=None, help="black-box steps per allocator")
    parser.add_argument("--seed", type=int, default=None, help="root seed (default: 0)")
    parser.add_argument("--pretrain-max-steps", type=int, default=None, help="bound on the pretraining")

    def _main(args) -> None:
        cfg = QUICK if args.quick else PromptConfig()
        fields = {
            "backend": args.backend,
            "steps": args.steps,
            "seed": args.seed,
            "pretrain_max_steps": args.pretrain_max_steps,
        }
        main(dataclasses.replace(cfg, **{k: v for k, v in fields.items() if v is not None}), args.out, args.quick)

    run_main(parser, _main)
