"""Config files: YAML loading, the ``job:`` section beside the training fields, and ``--set`` overrides.

A config YAML holds the :class:`~flops_ray.config.train.TrainConfig` fields at top level plus an optional
``job:`` section for :class:`JobConfig` (settings of the run, not of the maths). ``--set key=value``
overrides either, with dotted keys (``allocator.kind=equal``, ``groups.0.sigma=0.1``,
``job.checkpoint_every=20``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from flops_ray.config import ConfigError, JobConfig, TrainConfig
from flops_ray.config.plain import config_from_dict, config_to_dict, dataclass_from_dict, plain, renamed


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text else ""


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override to nested config data in place (value parsed as YAML)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. allocator.kind=equal")
    parts = renamed(key).split(".")
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


def jobs_dir() -> Path:
    """The ``jobs/`` scripts and configs: beside the package in a source checkout, else the working directory's."""
    beside = Path(__file__).resolve().parents[2] / "jobs"
    return beside if beside.is_dir() else Path("jobs")


DEFAULT_CONFIG = jobs_dir() / "configs" / "digits_ops_lr.yaml"
"""The config of ``jobs/finetune_vit.py`` and ``flops-ray train`` when ``--config`` is not given (a Ray farm run)."""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[TrainConfig, JobConfig]:
    """Read a config YAML (``None``: the built-in defaults) and apply ``--set`` overrides.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: unknown or invalid fields, naming them.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config {path} does not exist")
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is a mapping of fields, got {type(data).__name__}")
    job = data.pop("job", None)
    # Overrides go onto the complete config, so a default field (groups.0.sigma) can be changed too.
    full = {**config_to_dict(config_from_dict(data)), "job": plain(dataclass_from_dict(JobConfig, job, "job"))}
    for assignment in overrides:
        apply_override(full, assignment)
    job = full.pop("job")
    from flops_ray.step.checks import check_config  # torch: imported on use, so `flops-ray --help` stays light

    return check_config(config_from_dict(full)), dataclass_from_dict(JobConfig, job, "job").validate()


def quick_config(cfg: TrainConfig, job: JobConfig) -> tuple[TrainConfig, JobConfig]:
    """A tiny version of a run for tests and smoke checks: at most 4 steps of 16 samples at the least budget.

    The digits ViT is used without its backprop pretraining (which costs tens of seconds on 2 cores).
    """
    from flops_ray.step.checks import check_config, least_queries

    least = least_queries(cfg.estimator, cfg.allocator)
    groups = tuple(dataclasses.replace(g, queries_per_sample=min(g.queries_per_sample, least)) for g in cfg.groups)
    alloc = dataclasses.replace(
        cfg.allocator,
        gaussian_iters=min(cfg.allocator.gaussian_iters, 3),
        gaussian_draws=min(cfg.allocator.gaussian_draws, 8),
    )
    cfg = cfg.replace(
        model="digits_vit" if cfg.model == "digits_vit_pretrained" else cfg.model,
        data=dataclasses.replace(cfg.data, limit=min(cfg.data.limit or 512, 512)),
        steps=min(cfg.steps, 4),
        batch_size=min(cfg.batch_size, 16),
        eval_every=2,
        groups=groups,
        allocator=alloc,
        farm=dataclasses.replace(cfg.farm, replicas=min(cfg.farm.max_replicas, 2)),
    )
    return check_config(cfg), dataclasses.replace(job, log_every=1)


def output_dir(out: str | None, config: str | None, job: JobConfig) -> Path:
    """``--out`` if given, else ``job.out``, else ``runs/<config file stem>`` (``runs/default`` without a file)."""
    if out or job.out:
        return Path(out or job.out).expanduser()
    return Path("runs") / (Path(config).stem if config else "default")


def add_train_arguments(parser: argparse.ArgumentParser, default_config: str | Path | None = DEFAULT_CONFIG) -> None:
    """The options shared by ``jobs/finetune_vit.py`` and ``flops-ray train`` (``None``: the built-in defaults)."""
    default_config = None if default_config is None else str(default_config)
    parser.add_argument(
        "--config",
        default=default_config,
        help="config YAML: TrainConfig fields plus an optional job: section"
        + (f" (default: {default_config})" if default_config else " (default: the built-in OPS-LR digits run)"),
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory for summary.json, metrics.parquet, checkpoint.safetensors and plots "
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


def train_run(args: argparse.Namespace) -> tuple[TrainConfig, JobConfig, Path]:
    """The config, run settings and output directory that options of :func:`add_train_arguments` name."""
    cfg, job = load_config(args.config, args.set)
    return cfg, job, output_dir(args.out, args.config, job)
