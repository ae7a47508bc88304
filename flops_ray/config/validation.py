"""The one validation style of every config: ``require(ok, "section.field", why)`` raising :class:`ConfigError`."""

from __future__ import annotations

import reprlib

MAX_MESSAGE = 2000
"""Characters a config error's message keeps: a value pasted (or an alias bomb expanded) into a field
must not turn the one line of an error into megabytes."""

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 8, 8, 3


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (at most :data:`MAX_MESSAGE` characters)."""

    def __init__(self, message: str):
        if len(message) > MAX_MESSAGE:
            message = f"{message[: MAX_MESSAGE - 50]}... ({len(message)} characters in all)"
        super().__init__(message)


def shown(value: object) -> str:
    """``repr(value)`` cut short (long strings, long or deep lists and mappings), for messages.

    >>> shown(list(range(100)))
    '[0, 1, 2, 3, 4, 5, 6, 7, ...]'
    """
    return _SHORT.repr(value)


def require(ok: bool, name: str, why: str) -> None:
    """Raise :class:`ConfigError` ``"name: why"`` unless ``ok``: the one validation style of every config."""
    if not ok:
        raise ConfigError(f"{name}: {why}")
