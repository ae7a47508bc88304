"""The one validation style of every config: ``require(ok, "section.field", why)`` raising :class:`ConfigError`."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def require(ok: bool, name: str, why: str) -> None:
    """Raise :class:`ConfigError` ``"name: why"`` unless ``ok``: the one validation style of every config."""
    if not ok:
        raise ConfigError(f"{name}: {why}")
