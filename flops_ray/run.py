"""Training runs as the jobs and the CLI launch them: config files, data, checkpoints, metrics and plots.

``jobs/finetune_vit.py`` and ``flops-ray train`` are thin wrappers over :func:`train`. A config YAML holds
the :class:`~flops_ray.config.TrainConfig` fields at top level plus an optional ``job:`` section for
:class:`JobConfig` (settings of the run, not of the maths). ``--set key=value`` overrides either, with
dotted keys (``allocator.kind=equal``, ``groups.0.sigma=0.1``, ``job.checkpoint_every=20``).

This module never imports ray itself: the trainer loads the Ray backend when ``farm.backend`` is ``ray``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from flops_ray.checkpoint import (
    checkpoint_config,
    load_checkpoint,
    load_model_state,
    load_pretrained,
    save_checkpoint,
)
from flops_ray.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from flops_ray.data import ArrayDataset, digits
from flops_ray.metrics_log import MetricsLog
from flops_ray.models import create_model
from flops_ray.parquet_data import read_parquet
from flops_ray.plot import plot_metrics
from flops_ray.trainer import StepLog, Trainer, accuracy

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.parquet"
SUMMARY = "finetune_vit.json"


@dataclass(frozen=True)
class JobConfig:
    """Settings of a run that do not change the maths: the ``job:`` section of a config YAML."""

    out: str = ""
    """Output directory when ``--out`` is not given (empty: ``runs/<config file stem>``)."""
    test_dataset: str = ""
    """Parquet file of the test split. Empty: the training file's name with ``train`` replaced by
    ``test`` (``cifar100_train.parquet`` -> ``cifar100_test.parquet``) if that file exists, else no test set."""
    image_column: str = "image"
    """Parquet column of encoded images."""
    label_column: str = "label"
    """Parquet column of integer labels."""
    in_chans: int = 0
    """Image channels (1 or 3); 0 reads them from the model's first convolution."""
    cache_dir: str = ""
    """Directory for memory-mapped decoded images (Parquet datasets larger than memory); empty: in memory."""
    limit: int = 0
    """Use only the first this many samples of each split (0: all)."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end). Each save replaces the last atomically."""
    log_every: int = 10
    """Print a progress line every this many steps."""
    flush_every: int = 50
    """Metrics rows per Parquet row group."""

    def validate(self) -> JobConfig:
        """Check the fields; returns self."""
        for name in ("limit", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"job.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("log_every", "flush_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"job.{name}: must be >= 1, got {getattr(self, name)}")
        if self.in_chans not in (0, 1, 3):
            raise ConfigError(f"job.in_chans: must be 0 (from the model), 1 or 3, got {self.in_chans}")
        return self


# ---- configs --------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text) if text else ""
    if isinstance(value, str):
        # YAML 1.1 reads "1e-3" as a string; a number is what a user typing it means.
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override to nested config data in place (value parsed as YAML)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. allocator.kind=equal")
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where} is not an index of a list of {len(node)}")
            node = node[int(part)]
        elif isinstance(node, dict):
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"--set {key}: {where} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last} is not an index of a list of {len(node)}")
        node[int(last)] = _parse_value(text)
    else:
        node[last] = _parse_value(text)


def _job_from_dict(data: dict[str, Any]) -> JobConfig:
    known = {f.name for f in dataclasses.fields(JobConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"job: unknown keys {unknown}; known keys are {sorted(known)}")
    return JobConfig(**data).validate()


def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[TrainConfig, JobConfig]:
    """Read a config YAML (``None``: the built-in defaults) and apply ``--set`` overrides.

    Raises:
        ConfigError: unknown or invalid fields, naming them.
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is a mapping of fields, got {type(data).__name__}")
    job = dict(data.pop("job", None) or {})
    # Overrides go onto the complete config, so a default field (groups.0.sigma) can be changed too.
    full = {**config_to_dict(config_from_dict(data)), "job": {**dataclasses.asdict(JobConfig()), **job}}
    for assignment in overrides:
        apply_override(full, assignment)
    job = full.pop("job")
    return config_from_dict(full), _job_from_dict(job)


def quick_config(cfg: TrainConfig, job: JobConfig) -> tuple[TrainConfig, JobConfig]:
    """A tiny version of a run for tests and smoke checks: at most 4 steps of 16 samples at the least budget.

    The digits ViT is used without its backprop pretraining (which costs tens of seconds on 2 cores).
    """
    least = max(cfg.estimator.floor, cfg.estimator.pilot_queries)
    groups = tuple(dataclasses.replace(g, queries_per_sample=min(g.queries_per_sample, least)) for g in cfg.groups)
    alloc = dataclasses.replace(
        cfg.allocator,
        gaussian_iters=min(cfg.allocator.gaussian_iters, 3),
        gaussian_draws=min(cfg.allocator.gaussian_draws, 8),
    )
    cfg = cfg.replace(
        model="digits_vit" if cfg.model == "digits_vit_pretrained" else cfg.model,
        steps=min(cfg.steps, 4),
        batch_size=min(cfg.batch_size, 16),
        eval_every=2,
        groups=groups,
        allocator=alloc,
        farm=dataclasses.replace(cfg.farm, workers=min(cfg.farm.workers, 2)),
    )
    return cfg.validate(), dataclasses.replace(job, limit=min(job.limit or 512, 512), log_every=1)


# ---- data -----------------------------------------------------------------------------------------------
def model_in_chans(model: nn.Module) -> int:
    """Input channels of a model: those of its first convolution (timm patch embeddings and stems)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"cannot tell the input channels of {type(model).__name__}; set job.in_chans")


def _limit(data: ArrayDataset, n: int) -> ArrayDataset:
    return data if not n or n >= len(data) else ArrayDataset(data.x[:n], data.y[:n])


def sibling_test_path(train_path: str) -> Path | None:
    """The conventional test file of a Parquet training file (``train`` -> ``test`` in the name), if it exists."""
    path = Path(train_path).expanduser()
    if "train" not in path.name:
        return None
    candidate = path.with_name(path.name.replace("train", "test"))
    return candidate if candidate.is_file() else None


def load_datasets(cfg: TrainConfig, job: JobConfig, model: nn.Module) -> tuple[ArrayDataset, ArrayDataset | None]:
    """The training and test splits ``cfg.dataset`` names, checked against ``cfg.num_classes``."""
    if cfg.dataset == "digits":
        train, test = digits("train", cfg.img_size), digits("test", cfg.img_size)
    else:
        chans = job.in_chans or model_in_chans(model)

        def read(path: str | Path, split: str) -> ArrayDataset:
            cache = Path(job.cache_dir).expanduser() / split if job.cache_dir else None
            return read_parquet(
                path, cfg.img_size, chans, job.image_column, job.label_column, cache, limit=job.limit or None
            )

        test_path = Path(job.test_dataset).expanduser() if job.test_dataset else sibling_test_path(cfg.dataset)
        train = read(Path(cfg.dataset).expanduser(), "train")
        test = read(test_path, "test") if test_path else None
    train, test = _limit(train, job.limit), test and _limit(test, job.limit)
    for name, data in (("dataset", train), ("test dataset", test)):
        if data is not None and len(data) and (data.y.min() < 0 or data.y.max() >= cfg.num_classes):
            raise ConfigError(
                f"num_classes: {name} labels range over [{data.y.min()}, {data.y.max()}] "
                f"but num_classes is {cfg.num_classes}"
            )
    return train, test


# ---- training -------------------------------------------------------------------------------------------
def _progress(log: StepLog, total: int, eta: float) -> str:
    acc_text = f"{log.accuracy:.3f}" if log.accuracy is not None else "  -  "
    qps = log.queries / log.seconds if log.seconds > 0 else 0.0
    skipped = f"  skipped {log.skipped} queries" if log.skipped else ""
    return (
        f"step {log.step + 1:>5}/{total}  loss {log.loss:.4f}  acc {acc_text}  {qps:>9,.0f} queries/s"
        f"  {log.seconds:.2f} s/step  eta {eta / 60:.1f} min{skipped}"
    )


def train(
    cfg: TrainConfig,
    out: str | Path,
    job: JobConfig | None = None,
    quick: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` and write ``out/{finetune_vit.json, metrics.parquet, checkpoint.safetensors, *.png}``.

    Args:
        cfg: the training config.
        out: output directory.
        job: run settings (data columns, checkpoint cadence, ...).
        quick: shrink the run with :func:`quick_config` (tests, smoke checks).
        resume: continue from ``out/checkpoint.safetensors`` when it exists (else start fresh). The
            config must match the checkpoint's up to run length, logging and farm settings.

    Returns:
        The summary written to ``finetune_vit.json``.
    """
    t0 = time.perf_counter()
    job = (job or JobConfig()).validate()
    if quick:
        cfg, job = quick_config(cfg, job)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    resuming = resume and ckpt.is_file()
    if resume and not resuming:
        print(f"no checkpoint at {ckpt}: starting a new run", flush=True)

    model = create_model(cfg.model, cfg.num_classes, cfg.img_size, cfg.seed)
    if resuming:
        load_model_state(model, ckpt)
    elif cfg.pretrained:
        kept = load_pretrained(model, Path(cfg.pretrained).expanduser())
        print(f"loaded {cfg.pretrained}" + (f" (fresh {', '.join(kept)})" if kept else ""), flush=True)
    train_set, test_set = load_datasets(cfg, job, model)
    trainer = Trainer(cfg, model, train_set, test_set)
    start = load_checkpoint(trainer, ckpt) if resuming else 0
    if resuming:
        print(f"resumed from {ckpt} at step {start}", flush=True)

    metrics = MetricsLog(
        out / METRICS, [g.name for g in cfg.groups], job.flush_every, resume_step=start if resuming else None
    )
    queries, train_seconds, last_acc = 0, 0.0, None
    try:
        every = cfg.eval_every
        while trainer.step_count < cfg.steps:
            log = trainer.step()
            done = trainer.step_count
            if test_set is not None and (done == cfg.steps or (every and done % every == 0)):
                log.accuracy = last_acc = trainer.evaluate()
            metrics.append(log)
            queries += log.queries
            train_seconds += log.seconds
            if done % job.log_every == 0 or done == cfg.steps:
                eta = (cfg.steps - done) * train_seconds / (done - start)
                print(_progress(log, cfg.steps, eta), flush=True)
            if job.checkpoint_every and done % job.checkpoint_every == 0:
                # Rows first: a checkpoint at step N promises every metrics row before N is on disk.
                metrics.flush()
                save_checkpoint(trainer, ckpt)
        metrics.flush()
        save_checkpoint(trainer, ckpt)
        if test_set is not None and last_acc is None:
            last_acc = trainer.evaluate()
    finally:
        metrics.close()
        trainer.close()
    plots = plot_metrics(out / METRICS, out)
    summary = {
        "final_test_accuracy": last_acc,
        "steps": trainer.step_count,
        "steps_run": trainer.step_count - start,
        "resumed_from_step": start if resuming else None,
        "queries": queries,
        "queries_per_s": queries / train_seconds if train_seconds > 0 else None,
        "wall_seconds": time.perf_counter() - t0,
        "train_size": len(train_set),
        "test_size": len(test_set) if test_set is not None else 0,
        "config": config_to_dict(cfg),
        "job": dataclasses.asdict(job),
        "quick": quick,
        "files": {"checkpoint": CHECKPOINT, "metrics": METRICS, "plots": [p.name for p in plots]},
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    acc_text = f"{last_acc:.4f}" if last_acc is not None else "n/a (no test set)"
    print(f"done: {trainer.step_count} steps, test accuracy {acc_text}, {summary['wall_seconds']:.1f} s -> {out}")
    return summary


def evaluate(checkpoint: str | Path, job: JobConfig | None = None) -> dict[str, Any]:
    """Test accuracy of a checkpoint's model on the test split of the dataset its config names."""
    job = (job or JobConfig()).validate()
    cfg = checkpoint_config(checkpoint)
    model = create_model(cfg.model, cfg.num_classes, cfg.img_size, cfg.seed)
    step = load_model_state(model, checkpoint)
    _, test = load_datasets(cfg, job, model)
    if test is None:
        raise ConfigError(f"dataset: {cfg.dataset} has no test split; set job.test_dataset")
    return {"checkpoint": str(checkpoint), "step": step, "test_accuracy": accuracy(model, test), "test_size": len(test)}


# ---- command line ---------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """The options shared by ``jobs/finetune_vit.py`` and ``flops-ray train``."""
    parser.add_argument(
        "--config",
        default=default_config,
        help="config YAML: TrainConfig fields plus an optional job: section"
        + (f" (default: {default_config})" if default_config else " (default: the built-in OPS-LR digits run)"),
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory for finetune_vit.json, metrics.parquet, checkpoint.safetensors and plots "
        "(default: job.out of the config, else runs/<config name>)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run: at most 4 steps of 16 samples at the least budget"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.safetensors if it exists (else start)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, repeatable: --set steps=10 --set allocator.kind=equal "
        "--set groups.0.sigma=0.1 --set job.checkpoint_every=50 (values parsed as YAML)",
    )


def train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`train` from parsed :func:`add_train_arguments` options."""
    cfg, job = load_config(args.config, args.set)
    return train(cfg, output_dir(args.out, args.config, job), job, quick=args.quick, resume=args.resume)


def output_dir(out: str | None, config: str | None, job: JobConfig) -> Path:
    """``--out`` if given, else ``job.out``, else ``runs/<config file stem>`` (``runs/default`` without a file)."""
    if out or job.out:
        return Path(out or job.out).expanduser()
    return Path("runs") / (Path(config).stem if config else "default")
