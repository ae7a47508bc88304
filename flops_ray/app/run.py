"""Training runs as the jobs and the CLI launch them: data, checkpoints, metrics, progress and plots.

``jobs/finetune_vit.py`` and ``flops-ray train`` are thin wrappers over :func:`train`; configs come from
:mod:`flops_ray.app.job_config`. This module never imports ray itself: the trainer loads the Ray backend
when ``farm.backend`` is ``ray``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from flops_ray.app.hooks import Checkpointer, ClipWatch, GracefulStop, MetricsRecorder, NoiseWatch, Progress
from flops_ray.app.job_config import quick_config
from flops_ray.app.lock import owned
from flops_ray.app.plot import plot_metrics
from flops_ray.config import ConfigError, DataConfig, JobConfig, TrainConfig
from flops_ray.config.plain import config_to_dict, plain
from flops_ray.data.arrays import ArrayDataset, digits
from flops_ray.data.parquet import read_parquet
from flops_ray.data.text import is_text_dataset, read_text
from flops_ray.files import write_text
from flops_ray.models.causal_lm import CausalLMScorer
from flops_ray.models.factory import create_model
from flops_ray.models.hf import is_hf_model, load_tokenizer
from flops_ray.models.lm_groups import lm_groups
from flops_ray.models.lora import add_lora, lora_groups
from flops_ray.models.losses import LossFn, completion_loss, cross_entropy
from flops_ray.step.interface import StepReport
from flops_ray.training.checkpoint import checkpoint_config, load_model_state
from flops_ray.training.loggers import Loggers, require_packages
from flops_ray.training.metrics_log import MetricsLog
from flops_ray.training.trainer import StepHook, Trainer, accuracy
from flops_ray.training.weights import load_pretrained

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.parquet"
SUMMARY = "summary.json"
"""The summary file of every job, under one name (:func:`write_summary`)."""


# ---- data -----------------------------------------------------------------------------------------------
def model_in_chans(model: nn.Module) -> int:
    """Input channels of a model: those of its first convolution (timm patch embeddings and stems)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"cannot tell the input channels of {type(model).__name__}; set data.in_chans")


def _limit(data: ArrayDataset, n: int) -> ArrayDataset:
    return data if not n or n >= len(data) else ArrayDataset(data.x[:n], data.y[:n])


def sibling_test_path(train_path: str) -> Path | None:
    """The conventional test file of a Parquet training file (``train`` -> ``test`` in the name), if it exists."""
    path = Path(train_path).expanduser()
    if "train" not in path.name:
        return None
    candidate = path.with_name(path.name.replace("train", "test"))
    return candidate if candidate.is_file() else None


def _test_path(data: DataConfig) -> Path | None:
    return Path(data.test_dataset).expanduser() if data.test_dataset else sibling_test_path(data.dataset)


def text_datasets(data: DataConfig, model: nn.Module) -> tuple[ArrayDataset, ArrayDataset | None]:
    """The splits of a prompt-completion file (:mod:`flops_ray.data.text`), tokenised with the tokenizer saved with
    the model (a Hugging Face causal LM); ``data.num_classes`` does not apply."""
    if not isinstance(model, CausalLMScorer):
        raise ConfigError(f"data.dataset: {data.dataset} is a text dataset, for a causal LM (model: hf:...)")
    tokenizer = load_tokenizer(model.source)
    test_path = _test_path(data)
    train = read_text(data.dataset, tokenizer, "train", data.limit)
    return train, read_text(test_path, tokenizer, "test", data.limit) if test_path else None


def load_datasets(data: DataConfig, model: nn.Module) -> tuple[ArrayDataset, ArrayDataset | None]:
    """The training and test splits ``data.dataset`` names, checked against ``data.num_classes`` (text datasets:
    :func:`text_datasets`)."""
    if data.dataset != "digits" and is_text_dataset(data.dataset):
        return text_datasets(data, model)
    if isinstance(model, CausalLMScorer):
        raise ConfigError(
            f"data.dataset: a causal LM trains on text (.jsonl, or Parquet with a prompt column), got {data.dataset}"
        )
    if data.dataset == "digits":
        train, test = digits("train", data.img_size), digits("test", data.img_size)
    else:
        chans = data.in_chans or model_in_chans(model)

        def read(path: str | Path, split: str) -> ArrayDataset:
            cache = Path(data.cache_dir).expanduser() / split if data.cache_dir else None
            return read_parquet(
                path, data.img_size, chans, data.image_column, data.label_column, cache, limit=data.limit or None
            )

        test_path = _test_path(data)
        train = read(Path(data.dataset).expanduser(), "train")
        test = read(test_path, "test") if test_path else None
    train, test = _limit(train, data.limit), test and _limit(test, data.limit)
    for name, split in (("dataset", train), ("test dataset", test)):
        if split is not None and len(split) and (split.y.min() < 0 or split.y.max() >= data.num_classes):
            raise ConfigError(
                f"data.num_classes: {name} labels range over [{split.y.min()}, {split.y.max()}] "
                f"but num_classes is {data.num_classes}"
            )
    return train, test


# ---- training -------------------------------------------------------------------------------------------
def fit_to_model(cfg: TrainConfig, model: nn.Module) -> tuple[TrainConfig, LossFn]:
    """The config and loss for ``model``: a causal LM (``hf:``) trains the loss of its completions on its own
    default groups where ``cfg`` keeps the digits ViT's (:func:`~flops_ray.models.lm_groups.lm_groups`); the
    config the trainer gets, and checkpoints, hold the groups it trains. With ``lora.rank`` > 0 the defaults are
    the LoRA adapters (:func:`~flops_ray.models.lora.lora_groups`)."""
    if not is_hf_model(cfg.model):
        return cfg, cross_entropy
    groups = lora_groups(model, cfg.groups) if cfg.lora.on else cfg.groups
    return cfg.replace(groups=lm_groups(model, groups)), completion_loss


def build(cfg: TrainConfig, resume_from: Path | None = None) -> Trainer:
    """The model, data and trainer of ``cfg``; resumed from a checkpoint when ``resume_from`` is given."""
    # Hub weights are read here, on the driver, once; replicas receive this model. A resumed run skips them.
    hub = cfg.pretrained is True and resume_from is None
    model = create_model(cfg.model, cfg.data.num_classes, cfg.data.img_size, cfg.seed, pretrained=hub)
    model = add_lora(model, cfg.lora.validate(), cfg.seed)  # LoRA adapters (lora.rank > 0) before anything else
    if resume_from is not None:
        load_model_state(model, resume_from)
    elif hub:
        print(f"loaded timm's pretrained weights of {cfg.model}", flush=True)
    elif cfg.pretrained:
        kept = load_pretrained(model, Path(cfg.pretrained).expanduser())
        print(f"loaded {cfg.pretrained}" + (f" (fresh {', '.join(kept)})" if kept else ""), flush=True)
    train_set, test_set = load_datasets(cfg.data, model)
    print(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    tested = f"{len(test_set)} test samples" if test_set is not None else "no test split"
    print(f"data {cfg.data.dataset}: {len(train_set)} training samples, {tested}", flush=True)
    if not cfg.backprop and cfg.farm.backend == "ray":
        print(f"starting {cfg.farm.replicas} replicas on Ray ...", flush=True)
    cfg, loss_fn = fit_to_model(cfg, model)
    trainer = Trainer(cfg, model, train_set, test_set, loss_fn=loss_fn)
    print(trainer.backend.where() if trainer.backend is not None else "backprop in this process", flush=True)
    if resume_from is not None:
        trainer.resume(resume_from)
        print(f"resumed from {resume_from}: continuing at step {trainer.step_count}", flush=True)
    return trainer


def train(
    cfg: TrainConfig,
    out: str | Path,
    job: JobConfig | None = None,
    quick: bool = False,
    resume: bool = False,
    hooks: Sequence[StepHook] = (),
) -> dict[str, Any]:
    """Train ``cfg`` and write ``out/{summary.json, metrics.parquet, checkpoint.safetensors, *.png}``.

    Args:
        cfg: the training config.
        out: output directory.
        job: run settings (checkpoint cadence, logging, ...).
        quick: shrink the run with :func:`~flops_ray.app.job_config.quick_config` (tests, smoke checks).
        resume: continue from ``out/checkpoint.safetensors`` when it exists (else start fresh). The
            config must match the checkpoint's up to run length, logging and farm settings.
        hooks: more step hooks, called after the metrics row of each step is written (a tuning trial's report).

    Returns:
        The summary written to ``summary.json``.
    """
    t0 = time.perf_counter()
    job = (job or JobConfig()).validate()
    require_packages(job.loggers)  # a missing logger package fails before any replica starts
    if quick:
        cfg, job = quick_config(cfg, job)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Two runs writing one directory would mix checkpoints, metrics and summaries.
    with owned(out):
        return _train(cfg, out, job, quick, resume, t0, hooks)


def _train(
    cfg: TrainConfig, out: Path, job: JobConfig, quick: bool, resume: bool, t0: float, hooks: Sequence[StepHook] = ()
) -> dict[str, Any]:
    ckpt = out / CHECKPOINT
    resuming = resume and ckpt.is_file()
    if resume and not resuming:
        print(f"no checkpoint at {ckpt}: starting a new run", flush=True)
    trainer = build(cfg, ckpt if resuming else None)
    start, cfg = trainer.step_count, trainer.cfg  # the config as trained (a causal LM's groups are resolved)
    metrics = MetricsLog(out / METRICS, [g.name for g in cfg.groups], job.flush_every, start if resuming else None)
    if resuming and metrics.kept < start:
        print(f"warning: {out / METRICS} holds {metrics.kept} of the {start} rows before step {start}", flush=True)
    clips = ClipWatch([g.name for g in cfg.groups], cfg.grad_clip)
    progress = Progress(cfg.steps, start, job.log_every, clips)
    saver = Checkpointer(metrics, ckpt, job.checkpoint_every, job.checkpoint_minutes)
    stop = GracefulStop()
    try:
        loggers = Loggers(job, out, config_to_dict(cfg), start if resuming else None)
    except BaseException:
        metrics.close()
        trainer.close()
        raise
    record, watch = MetricsRecorder(metrics, loggers), NoiseWatch([g.name for g in cfg.groups], job.noise_warning_steps)
    try:
        initial_acc = trainer.evaluate() if trainer.test_set is not None else None
        with stop:
            reports = trainer.fit(hooks=[record, watch, clips, progress, saver, *hooks, stop.hook])
        saver.save(trainer)
        accs = [r.accuracy for r in reports if r.accuracy is not None]
        last_acc = accs[-1] if accs else (trainer.evaluate() if trainer.test_set is not None else None)
    except BaseException:
        # A step that fails is not applied, so the trainer holds its last whole step: keep it, unless a step
        # was cut off while being applied (then the checkpoint on disk stays the last good one).
        if trainer.consistent and trainer.step_count > start:
            saver.save(trainer)
            print(f"saved {ckpt}: --resume continues at step {trainer.step_count}", flush=True)
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            loggers.close([ckpt], ok=False)
        raise
    finally:
        metrics.close()
        trainer.close()
    if stop.requested:
        print(f"stopped by {stop.requested}: --resume continues at step {trainer.step_count}", flush=True)
    plots = plot_metrics(out / METRICS, out)
    queries = sum(r.queries for r in reports)
    # The Ray farm's retries, restarts and bytes (in-process runs have none).
    counters = getattr(trainer.backend, "counters", None)
    summary = write_summary(
        out,
        initial_acc,
        last_acc,
        *first_and_last_loss(reports),
        final_test_accuracy=last_acc,
        steps=trainer.step_count,
        steps_run=trainer.step_count - start,
        resumed_from_step=start if resuming else None,
        queries=queries,
        queries_per_s=queries / progress.seconds if progress.seconds > 0 else None,
        wall_seconds=time.perf_counter() - t0,
        train_size=len(trainer.train_set),
        test_size=len(trainer.test_set) if trainer.test_set is not None else 0,
        config=config_to_dict(cfg),
        job=plain(job),
        quick=quick,
        stopped_by=stop.requested,
        farm=dataclasses.asdict(counters) if counters is not None else None,
        files={"checkpoint": CHECKPOINT, "metrics": METRICS, "plots": [p.name for p in plots]},
    )
    loggers.close([ckpt, out / SUMMARY], ok=stop.requested is None)
    acc_text = f"{last_acc:.4f}" if last_acc is not None else "n/a (no test set)"
    print(f"done: {trainer.step_count} steps, test accuracy {acc_text}, {summary['wall_seconds']:.1f} s -> {out}")
    return summary


# ---- the summary --------------------------------------------------------------------------------------
def write_summary(
    out: Path,
    initial_accuracy: float | None,
    accuracy: float | None,
    initial_loss: float | None,
    loss: float | None,
    **figures: Any,
) -> dict[str, Any]:
    """Write a job's summary to ``out/summary.json`` and return it: first the keys every job's summary has (test
    accuracy before and after training, training loss of the first and the last step; None where the job has
    none), then the job's own ``figures``."""
    summary = {"initial_accuracy": initial_accuracy, "accuracy": accuracy, "initial_loss": initial_loss, "loss": loss}
    summary.update(figures)
    write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def first_and_last_loss(reports: list[StepReport]) -> tuple[float | None, float | None]:
    """The training loss of the first and of the last of ``reports`` (None, None: no steps)."""
    return (reports[0].loss, reports[-1].loss) if reports else (None, None)


def evaluate(checkpoint: str | Path, **data: Any) -> dict[str, Any]:
    """Test accuracy of a checkpoint's model on the test split of its config's dataset.

    Args:
        checkpoint: the checkpoint file.
        data: :class:`~flops_ray.config.train.DataConfig` fields to change (``test_dataset``, ``limit``, ...).
    """
    cfg = checkpoint_config(checkpoint)
    data_cfg = dataclasses.replace(cfg.data, **data)
    model = add_lora(create_model(cfg.model, data_cfg.num_classes, data_cfg.img_size, cfg.seed), cfg.lora, cfg.seed)
    step = load_model_state(model, checkpoint)
    _, test = load_datasets(data_cfg, model)
    if test is None:
        raise ConfigError(f"data.test_dataset: {data_cfg.dataset} has no test split; set data.test_dataset")
    return {"checkpoint": str(checkpoint), "step": step, "test_accuracy": accuracy(model, test), "test_size": len(test)}
