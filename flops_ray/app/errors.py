"""How every command and job ends on a failure: one line ``error: ...`` and exit status 2, ``--debug`` for the
traceback; Ctrl-C ends quietly (the run has saved its checkpoint by then) with status 130.

An exception raised inside a Ray replica reaches the driver wrapped in Ray's task error, whose text is a
coloured header and the replica's stack; the line names the user's exception (type and message) instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

EXIT_ERROR = 2
"""Exit status of a failure (argparse's for a bad option, too)."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""
MAX_LINE = 2000
"""Characters the line keeps of a message (a message may quote a whole input)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray replica raised behind ``exc``, else ``exc`` (ray is asked only if it is loaded)."""
    if "ray" not in sys.modules:
        return exc
    from flops_ray.farm.errors import remote_cause

    return remote_cause(exc)


def error_line(exc: BaseException) -> str:
    """``error: <message> (<type>; --debug shows the traceback)`` on one line, for the exception a user's
    command failed with (a replica's own exception when Ray wrapped it)."""
    exc = _cause(exc)
    words = " ".join(line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip())
    if len(words) > MAX_LINE:
        words = f"{words[: MAX_LINE - 40]}... ({len(words)} characters)"
    kind = type(exc).__name__
    return (
        f"error: {words} ({kind}; --debug shows the traceback)"
        if words
        else f"error: {kind} (--debug shows the traceback)"
    )


def reported(body: Callable[[], object], debug: bool = False) -> int:
    """Run ``body`` and return its exit status (anything but an int: 0); an exception prints :func:`error_line` to stderr and
    returns :data:`EXIT_ERROR` (``debug``: raised, traceback and all); Ctrl-C prints ``interrupted`` and
    returns :data:`EXIT_INTERRUPTED`."""
    try:
        status = body()
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure of a command is reported the same way
        if debug:
            raise
        print(error_line(exc), file=sys.stderr, flush=True)
        return EXIT_ERROR
    return status if isinstance(status, int) else 0  # a job's main returns its summary


def add_debug_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--debug`` (show the traceback of an error instead of its one line) to ``parser``; returns it."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def run_main(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], object]) -> None:
    """A job's ``__main__``: parse the options (``parser`` with :func:`add_debug_option`), run ``body(args)``
    :func:`reported`, and exit with its status."""
    args = parser.parse_args()
    sys.exit(reported(lambda: body(args), args.debug))
