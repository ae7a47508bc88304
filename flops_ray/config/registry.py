"""The one registry shape: names a config can hold, mapped to what serves them, refusing unknown names.

Estimators, allocators and models each keep one (timm's ``_registry`` pattern): a decorator fills it, and a
lookup of a name nobody registered raises :class:`UnknownNameError` listing the known names, at the point
where the object is created.

>>> COLOURS = Registry("paint.colour")
>>> _ = COLOURS.register("red")(object)
>>> COLOURS["blue"]
Traceback (most recent call last):
...
flops_ray.config.registry.UnknownNameError: paint.colour: must be one of ['red'], got 'blue'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flops_ray.config.validation import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError):
    """A name no registry entry answers to; the message names the config field and lists the known names."""


class Registry(dict[str, T]):
    """``name -> implementation``, filled by :meth:`register`; ``registry[name]`` refuses an unknown name."""

    def __init__(self, field: str, also: str = ""):
        super().__init__()
        self.field = field
        """The config field holding these names, e.g. ``estimator.kind`` (named in every error)."""
        self.also = also
        """What else the field accepts beside the registered names (e.g. any timm model name)."""

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator registering an implementation under ``names`` (its ``__name__`` when none are given)."""

        def add(obj: T) -> T:
            for name in names or (obj.__name__,):
                self[name] = obj
            return obj

        return add

    def unknown(self, name: str) -> UnknownNameError:
        """The error for a name nobody registered."""
        also = f" {self.also}" if self.also else ""
        return UnknownNameError(f"{self.field}: must be one of {sorted(self)}{also}, got {name!r}")

    def __missing__(self, name: str) -> T:
        raise self.unknown(name)
