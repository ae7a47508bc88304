"""One run per output directory: a lock file naming its owner (host and pid), refused to a second run.

A lock whose owner is a process of this host that no longer exists is stale and taken over; a lock from
another host is trusted (its process cannot be checked from here) and must be removed by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK = ".flops_ray.lock"


class RunLockedError(RuntimeError):
    """Another run owns the output directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def owned(out: Path) -> Iterator[Path]:
    """Hold ``out``'s lock while the body runs; raise :class:`RunLockedError` naming a live owner."""
    path = Path(out) / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
                pid = int(owner.get("pid"))
            except (OSError, ValueError, TypeError, AttributeError):
                owner, pid = {}, -1
            if owner.get("host") == me["host"] and pid > 0 and not _alive(pid):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise RunLockedError(
                f"{out} is in use by the run of process {owner.get('pid')} on {owner.get('host')} "
                f"({path}); use another --out, or delete the lock if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
