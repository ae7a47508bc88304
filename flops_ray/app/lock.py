"""One run per output directory: a lock file naming its owner (host and pid), refused to a second run.

The lock is the operating system's (``fcntl.flock`` on the file), so it ends with its process however that
process ends, and two runs starting at once over a stale file cannot both take it: the kernel hands it to
one. The file's text names the owner for the message a second run gets. A file that is not locked is
stale and taken over, unless it names another host: a run there holds the lock only where the file system
shares locks between hosts, so its file is trusted and must be removed by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK = ".flops_ray.lock"


class RunLockedError(RuntimeError):
    """Another run owns the output directory."""


def _owner(fd: int) -> dict:
    """The owner the lock file names (empty when it names none: being written, or not ours)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _refuse(out: Path, path: Path, owner: dict) -> RunLockedError:
    # An owner that has just taken the lock may not have written its name yet.
    who = f"the run of process {owner.get('pid')} on {owner.get('host')}" if owner else "a run starting now"
    return RunLockedError(
        f"{out} is in use by {who} ({path}); use another --out, or delete the lock if that run is gone"
    )


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (an owner that ended may have removed it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)


def _acquire(out: Path, path: Path, me: dict) -> int:
    """The open, locked lock file of ``out``, naming ``me``; raise :class:`RunLockedError` naming its owner."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _refuse(out, path, _owner(fd)) from None
            if not _same_file(fd, path):
                os.close(fd)  # locked a file its owner removed on leaving: lock the one at the path now
                continue
            owner = _owner(fd)
            if owner.get("host", me["host"]) != me["host"]:
                raise _refuse(out, path, owner)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


@contextlib.contextmanager
def owned(out: Path) -> Iterator[Path]:
    """Hold ``out``'s lock while the body runs; raise :class:`RunLockedError` naming a live owner."""
    path = Path(out) / LOCK
    fd = _acquire(Path(out), path, {"host": socket.gethostname(), "pid": os.getpid()})
    try:
        yield path
    finally:
        # Removed while still locked: a run that opened this file meanwhile sees it gone and starts over.
        path.unlink(missing_ok=True)
        os.close(fd)
