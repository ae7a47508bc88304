"""Search specs of ``flops-ray tune``: ``KEY=KIND:ARGS``, one per searched config key.

    lr=loguniform:1e-4:1e-1          log-uniform on [1e-4, 1e-1]
    groups.0.sigma=choice:1e-3,1e-2  one of the listed values (YAML scalars)
    batch_size=randint:16:64         an integer in [16, 64)
    allocator.kind=grid:equal,gaussian   every value, each in its own trials

>>> parse_search("groups.0.sigma=choice:1e-3,1e-2")
SearchSpec(key='groups.0.sigma', kind='choice', values=(0.001, 0.01))
>>> parse_search("lr=loguniform:1e-4:1e-1").values
(0.0001, 0.1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from flops_ray.config.validation import ConfigError, require

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
"""Spec kinds: ``choice``/``grid`` take a comma-separated list, the others ``low:high``."""


@dataclass(frozen=True)
class SearchSpec:
    """One searched config key and the values it may take."""

    key: str
    """The dotted config key, as ``--set`` takes it (``lr``, ``groups.0.sigma``, ``allocator.kind``)."""
    kind: str
    """One of :data:`KINDS`."""
    values: tuple[Any, ...]
    """``choice``/``grid``: the values; ``uniform``/``loguniform``/``randint``: ``(low, high)``."""


def _scalar(text: str, spec: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--search {spec}: {text!r} is not a value ({exc})") from exc
    # YAML reads 1e-3 (no dot) as a string; a number is what such a spec means.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_search(spec: str) -> SearchSpec:
    """The :class:`SearchSpec` of ``KEY=KIND:ARGS``.

    Raises:
        ConfigError: a malformed spec, naming it and the expected form.
    """
    key, sep, rest = spec.partition("=")
    kind, colon, args = rest.partition(":")
    require(bool(sep and key and colon), "--search", f"{spec!r}: expected KEY=KIND:ARGS, e.g. lr=loguniform:1e-4:1e-1")
    require(kind in KINDS, "--search", f"{spec!r}: unknown kind {kind!r}; known kinds are {list(KINDS)}")
    if kind in ("choice", "grid"):
        values = tuple(_scalar(v, spec) for v in args.split(","))
        require(len(values) >= 1 and all(v != "" for v in values), "--search", f"{spec!r}: no values")
        return SearchSpec(key, kind, values)
    bounds = args.split(":")
    require(len(bounds) == 2, "--search", f"{spec!r}: {kind} takes LOW:HIGH")
    low, high = (_scalar(b, spec) for b in bounds)
    numeric = all(isinstance(b, int | float) and not isinstance(b, bool) for b in (low, high))
    require(numeric and low < high, "--search", f"{spec!r}: needs numbers LOW < HIGH")
    require(kind != "loguniform" or low > 0, "--search", f"{spec!r}: loguniform needs LOW > 0")
    require(kind != "randint" or all(float(b).is_integer() for b in (low, high)), "--search", f"{spec!r}: integers")
    return SearchSpec(key, kind, (int(low), int(high)) if kind == "randint" else (float(low), float(high)))
