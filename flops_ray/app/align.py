"""Aligning a frozen vision encoder to a frozen causal LM forward-only (paper section 5.3, appendix C.3, Figure 5).

A run builds the :class:`~flops_ray.models.aligner.AlignedLM` of its config once (encoder, a seeded linear adapter,
LM), reads the captioned images, and trains the adapter with each method of ``align.methods`` from the same initial
adapter: OPS-LR (the config's estimator and allocator), LR with equal allocation, SPSA on the adapter's weights and
backprop through the LM. Each method's run records its training losses, whole-step wall times, the allocator's
share of a step and the test caption loss before and after; the adapter's greedy captions of a few test images are
set beside the random adapter's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from flops_ray.app.job_config import config_from_data, read_config
from flops_ray.app.run import sibling_test_path
from flops_ray.config import ConfigError, TrainConfig
from flops_ray.config.align import AlignSettings
from flops_ray.config.plain import dataclass_from_dict
from flops_ray.data.arrays import ArrayDataset
from flops_ray.data.captions import read_captions
from flops_ray.farm.ray_init import ray_session
from flops_ray.models.aligner import AlignedLM, load_vision_encoder
from flops_ray.models.hf import hf_source, load_causal_lm, load_tokenizer
from flops_ray.models.losses import completion_loss
from flops_ray.seeding import STREAM_INIT, derive_seed
from flops_ray.step.backprop import model_input
from flops_ray.step.interface import StepReport
from flops_ray.training.trainer import Trainer


@dataclasses.dataclass
class CaptionData:
    """The captioned images of a run."""

    train: ArrayDataset
    test: ArrayDataset
    test_captions: list[str]
    """The test split's reference captions, in order."""


def load_align_config(path: str | Path, overrides: list[str] = ()) -> tuple[AlignSettings, TrainConfig]:
    """The ``align:`` section and the training config of an alignment config file (``--set`` overrides applied to
    the training fields).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: unknown or invalid fields, naming them.
    """
    data = read_config(path)
    settings = dataclass_from_dict(AlignSettings, data.pop("align", None), "align").validate()
    return settings, config_from_data(data, overrides)[0]


def method_config(cfg: TrainConfig, method: str, settings: AlignSettings) -> TrainConfig:
    """The training config of ``method`` (:data:`~flops_ray.config.align.METHODS`): ``cfg`` as it is for OPS-LR;
    equal allocation for LR; SPSA on the adapter's weights (``align.spsa_sigma``) with equal allocation; backprop."""
    equal = dataclasses.replace(cfg.allocator, kind="equal")
    if method == "lr":
        return cfg.replace(allocator=equal)
    if method == "spsa":
        groups = tuple(dataclasses.replace(g, sigma=settings.spsa_sigma) for g in cfg.groups)
        return cfg.replace(estimator=dataclasses.replace(cfg.estimator, kind="spsa"), allocator=equal, groups=groups)
    if method == "bp":
        return cfg.replace(backprop=True)
    return cfg


def build_aligner(settings: AlignSettings, cfg: TrainConfig) -> tuple[AlignedLM, Any]:
    """The encoder of ``align.encoder``, the causal LM of ``model`` and an adapter initialised from the root seed;
    and the LM's tokenizer."""
    encoder = load_vision_encoder(settings.encoder, settings.encoder_pretrained)
    lm = load_causal_lm(cfg.model).lm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, STREAM_INIT))
        model = AlignedLM(encoder, lm, settings.visual_tokens, settings.image_size or encoder.image_size)
    return model.eval(), load_tokenizer(hf_source(cfg.model))


def caption_data(settings: AlignSettings, cfg: TrainConfig, model: AlignedLM, tokenizer: Any) -> CaptionData:
    """The training and test splits of ``data.dataset`` (test: ``data.test_dataset`` or the sibling file), tokenised
    with the LM's tokenizer, laid out for ``model``.

    Raises:
        ConfigError: no test split.
    """
    test_path = cfg.data.test_dataset or sibling_test_path(cfg.data.dataset)
    if not test_path:
        raise ConfigError(f"data.test_dataset: {cfg.data.dataset} has no sibling test file; set data.test_dataset")
    args = (tokenizer, model.image_size, settings.visual_tokens, settings.instruction, cfg.data.limit)
    train, _ = read_captions(cfg.data.dataset, *args)
    test, captions = read_captions(test_path, *args)
    return CaptionData(train, test, captions)


@torch.no_grad()
def test_loss(model: torch.nn.Module, data: ArrayDataset, batch: int = 128) -> float:
    """Mean caption loss (cross entropy per caption token, averaged over captions) of ``model`` on ``data``."""
    model.eval()
    total = 0.0
    for s in range(0, len(data), batch):
        x = model_input(model, data.x[s : s + batch])
        total += float(completion_loss(model(x), torch.from_numpy(data.y[s : s + batch])).sum())
    return total / len(data)


def captions(model: AlignedLM, data: CaptionData, settings: AlignSettings, tokenizer: Any) -> list[str]:
    """Greedy captions of the first ``align.generate`` test images."""
    x = model_input(model, data.test.x[: settings.generate])
    tokens = model.generate(x, settings.max_caption_tokens, tokenizer.eos_token_id)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def train_method(
    method: str, cfg: TrainConfig, model: AlignedLM, data: CaptionData, settings: AlignSettings, tokenizer: Any
) -> dict[str, Any]:
    """Train a copy of ``model``'s adapter with ``method``; returns its figures (see the module docstring)."""
    reports: list[StepReport] = []
    curve: list[dict[str, float]] = []

    def record(trainer: Trainer, report: StepReport) -> None:
        reports.append(report)
        step = trainer.step_count
        if step % max(cfg.eval_every, 1) == 0 or step == cfg.steps:
            loss = test_loss(trainer.model, data.test)
            curve.append({"step": step, "test_loss": loss, "caption_accuracy": report.accuracy})
            print(
                f"{method:6s} step {step:>4}/{cfg.steps}  loss {report.loss:.3f}  test loss {loss:.3f}  "
                f"{report.seconds:.2f} s/step",
                flush=True,
            )

    t0 = time.perf_counter()
    with Trainer(
        method_config(cfg, method, settings), copy.deepcopy(model), data.train, data.test, loss_fn=completion_loss
    ) as trainer:
        trainer.fit(hooks=[record])
        trained = trainer.model
        generated = captions(trained, data, settings, tokenizer) if settings.generate else []
    steady = reports[1:] or reports  # the first step also waits for the replicas to start
    elapsed = itertools.accumulate(r.seconds for r in reports)
    reached = next((t for t, r in zip(elapsed, reports) if r.loss <= settings.target_loss), None)
    return {
        "losses": [r.loss for r in reports],
        "step_seconds": statistics.median(r.seconds for r in steady),
        "allocator_seconds": statistics.median(r.allocator_seconds for r in steady),
        "fit_seconds": statistics.median(r.fit_seconds for r in steady),
        "seconds_to_target": reached,
        "queries": sum(r.queries for r in reports),
        "test_loss_after": curve[-1]["test_loss"],
        "caption_accuracy_after": curve[-1]["caption_accuracy"],
        "curve": curve,
        "captions": generated,
        "seconds": time.perf_counter() - t0,
    }


def align(settings: AlignSettings, cfg: TrainConfig, model: AlignedLM, data: CaptionData, tokenizer: Any) -> dict:
    """Run every method of ``settings`` on ``model`` and ``data``; returns the figures of ``align.json`` (without
    peak memory, measured apart)."""
    before = test_loss(model, data.test)
    random_captions = captions(model, data, settings, tokenizer) if settings.generate else []
    print(f"test caption loss with the initial (random) adapter: {before:.3f}", flush=True)
    methods = {}
    # One Ray for every method's farm: each would otherwise start (and stop) its own.
    with ray_session(cfg.farm) if cfg.farm.backend == "ray" else contextlib.nullcontext():
        for method in settings.methods:
            figures = train_method(method, cfg, model, data, settings, tokenizer)
            methods[method] = {"test_loss_before": before, **figures}
            print(f"{method}: test caption loss {before:.3f} -> {figures['test_loss_after']:.3f}", flush=True)
    shown = data.test_captions[: settings.generate]
    result: dict[str, Any] = {
        "methods": methods,
        "captions": {
            "reference": shown,
            "random_adapter": random_captions,
            **{m: r["captions"] for m, r in methods.items()},
        },
    }
    if "bp" in methods:
        # Of the gap from the random adapter's test loss to backprop's at the same steps, the share each closed.
        gap = before - methods["bp"]["test_loss_after"]
        result["gap_closed"] = {m: (before - r["test_loss_after"]) / gap for m, r in methods.items()}
    if "ops_lr" in methods:
        ops = methods["ops_lr"]
        result["allocator_seconds_per_step"] = ops["allocator_seconds"]
        result["allocator_share"] = ops["allocator_seconds"] / ops["step_seconds"]
    return result
