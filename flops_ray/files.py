"""Atomic file writes: a file appears under its name complete and on disk, or not at all (an old one stays)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the body returns, move the file onto ``path``.

    The temporary file is hidden (its name starts with ``.``, which pyarrow skips when it reads a folder),
    fsynced and renamed over ``path``, then the folder is fsynced; if the body raises, it is removed and
    ``path`` is left as it was. ``path``'s folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        # fsync before the rename: otherwise a power loss can leave the new name pointing at no data.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the whole new one)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _fsync_folder(folder: Path) -> None:
    # The rename lives in the folder's entry list, so the folder is fsynced too; Windows cannot open a folder.
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
