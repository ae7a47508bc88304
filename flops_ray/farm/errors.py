"""Errors the farm raises when it cannot finish a step."""


class FarmError(RuntimeError):
    """The farm cannot finish a step (a task exhausted its retries, or no replica makes progress)."""
