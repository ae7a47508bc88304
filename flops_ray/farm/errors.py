"""Errors the farm raises when it cannot finish a step."""


class FarmError(RuntimeError):
    """The farm cannot finish a step (a task exhausted its retries, or no replica makes progress)."""


def remote_cause(exc: BaseException) -> BaseException:
    """The exception raised inside a replica (or any Ray task) behind ``exc``, else ``exc`` itself.

    Ray re-raises it on the driver as a ``RayTaskError`` whose text is a header and the remote stack; its
    ``cause`` is the original exception, which names what went wrong in the user's terms.
    """
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) and exc.cause is not exc:
        exc = exc.cause
    return exc
