"""Configs from and to plain data (a parsed YAML, a checkpoint header), every field's type checked.

>>> from flops_ray.config import TrainConfig
>>> config_from_dict({"steps": 10, "farm": {"replicas": 3}}).farm.replicas
3
>>> config_from_dict({"steps": "ten"})
Traceback (most recent call last):
...
flops_ray.config.validation.ConfigError: steps: must be an integer, got 'ten'
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from typing import Any, TypeVar

from flops_ray.config.farm import RENAMED
from flops_ray.config.train import TrainConfig
from flops_ray.config.validation import ConfigError, require, shown

T = TypeVar("T")
KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
"""How messages name a scalar field's type."""


def dataclass_from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build the (frozen) dataclass ``cls`` from a mapping, naming unknown keys and values of the wrong type.

    Args:
        cls: the dataclass; nested dataclass and ``tuple[X, ...]`` fields are built recursively.
        data: the mapping (``None`` means all defaults).
        where: the dotted name of this section in messages (``""`` for the top level).

    Raises:
        ConfigError: naming the field.
    """
    data = {} if data is None else data
    require(isinstance(data, dict), where or "config", f"must be a mapping of fields, got {type(data).__name__}")
    data = {renamed(f"{where}.{k}" if where else k).rpartition(".")[2]: v for k, v in data.items()}
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(data) - set(known))
    require(not unknown, where or "config", f"unknown keys {unknown}; known keys are {known}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()})


def renamed(key: str) -> str:
    """The current name of the dotted config key ``key``, warning when it is an old one (:data:`RENAMED`)."""
    if key not in RENAMED:
        return key
    warnings.warn(
        f"config key {key} is now {RENAMED[key]}; the old name will stop working", FutureWarning, stacklevel=3
    )
    return RENAMED[key]


def _convert(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return dataclass_from_dict(tp, value, name)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        require(isinstance(value, list | tuple), name, f"must be a list, got {shown(value)}")
        return tuple(_convert(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _convert_union(typing.get_args(tp), value, name)
    if tp is float:
        return _to_float(value, name)
    if tp in KINDS:
        # bool is a subclass of int, but true is no integer a user meant.
        fits = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
        require(fits, name, f"must be {KINDS[tp]}, got {shown(value)}")
    return value


def _convert_union(options: tuple[Any, ...], value: Any, name: str) -> Any:
    # The first member the value fits, in the order the field declares them (``bool | str`` keeps true a bool).
    for tp in options:
        try:
            return _convert(tp, value, name)
        except ConfigError:
            continue
    if isinstance(value, bool | int | float | str):
        return value  # a scalar of another type: the section's validate() says what the field accepts
    kinds = ", or ".join(KINDS.get(tp, getattr(tp, "__name__", str(tp))) for tp in options)
    raise ConfigError(f"{name}: must be {kinds}, got {shown(value)}")


def _to_float(value: Any, name: str) -> float:
    # YAML 1.1 reads "1e-3" as a string; a number is what a user writing it means.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    require(
        isinstance(value, int | float) and not isinstance(value, bool),
        name,
        f"must be {KINDS[float]}, got {shown(value)}",
    )
    return float(value)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated :class:`~flops_ray.config.train.TrainConfig` from plain data."""
    return dataclass_from_dict(TrainConfig, data).validate()


def plain(obj: Any) -> Any:
    """Plain data of a (nested) config: dicts, lists and scalars, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data of a config (the inverse of :func:`config_from_dict`)."""
    return plain(cfg)
