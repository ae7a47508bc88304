"""Config files: YAML loading, the ``job:`` section beside the training fields, and ``--set`` overrides.

A config YAML holds the :class:`~flops_ray.config.train.TrainConfig` fields at top level plus an optional
``job:`` section for :class:`JobConfig` (settings of the run, not of the maths). ``--set key=value``
overrides either, with dotted keys (``allocator.kind=equal``, ``groups.0.sigma=0.1``,
``job.checkpoint_every=20``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from flops_ray.config import ConfigError, JobConfig, TrainConfig
from flops_ray.config.plain import config_from_dict, config_to_dict, dataclass_from_dict, plain, renamed
from flops_ray.config.validation import shown

MAX_VALUES = 100_000
"""Values (scalars, lists, mappings) a config may hold once its YAML aliases are expanded: a config has
hundreds; a few hundred bytes of nested aliases (an "alias bomb") expand to millions."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key given twice in one mapping (YAML's last-wins would hide a typo)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *base' keys may be overridden: that is what a merge is for
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base loader refuses it, naming it
            line = key_node.start_mark.line + 1
            if key in first:
                raise ConfigError(f"line {line}: key {shown(key)} is given twice (first on line {first[key]})")
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_values(data: Any, limit: int) -> int:
    """How many values ``data`` holds, counting each alias's every use; stops counting past ``limit``."""
    count, stack = 0, [data]
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


def parse_yaml(text: str, where: str) -> Any:
    """Parse config YAML ``text`` (``where`` names it in errors: a file, ``--set key``).

    Raises:
        ConfigError: one line: not YAML (with the line and column), a key given twice, or more than
            :data:`MAX_VALUES` values once aliases are expanded.
    """
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}{at}") from None
    if _expanded_values(data, MAX_VALUES) > MAX_VALUES:
        raise ConfigError(
            f"{where}: holds more than {MAX_VALUES:,} values once its aliases (*name) are expanded; "
            "a config has hundreds (an alias bomb?)"
        )
    return data


def _parse_value(text: str, key: str = "") -> Any:
    return parse_yaml(text, f"--set {key}") if text else ""


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
        node[int(last)] = _parse_value(text, key)
    else:
        node[last] = _parse_value(text, key)


def jobs_dir() -> Path:
    """The ``jobs/`` scripts and configs: beside the package in a source checkout, else the working directory's."""
    beside = Path(__file__).resolve().parents[2] / "jobs"
    return beside if beside.is_dir() else Path("jobs")


DEFAULT_CONFIG = jobs_dir() / "configs" / "digits_ops_lr.yaml"
"""The config of ``jobs/finetune_vit.py`` and ``flops-ray train`` when ``--config`` is not given (a Ray farm run)."""


def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping of fields a config YAML holds (checked as :func:`parse_yaml` checks).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: not YAML, or not a mapping.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    data = parse_yaml(Path(path).read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of fields, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[TrainConfig, JobConfig]:
    """Read a config YAML (``None``: the built-in defaults) and apply ``--set`` overrides.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: unknown or invalid fields, naming them.
    """
    return config_from_data(read_config(path) if path is not None else {}, overrides)


def config_from_data(data: dict[str, Any], overrides: list[str] = ()) -> tuple[TrainConfig, JobConfig]:
    """The training config and job settings of a config's fields ``data`` (consumed), ``--set`` overrides applied.

    Raises:
        ConfigError: unknown or invalid fields, naming them.
    """
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
