"""Writing Parquet image datasets: an image folder (one subfolder per class) or scikit-learn's digits.

The files have the columns ``image`` (PNG/JPEG bytes) and ``label`` (int64) that
:func:`flops_ray.data.parquet.read_parquet` reads, and are written only complete (captions files:
:func:`flops_ray.data.captions.captions_to_parquet`, through :func:`write_rows`).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flops_ray.data.images import ImageDecodeError, load_image
from flops_ray.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Modes PNG stores as they are; others are converted to 8-bit gray (one band) or RGB, as decode_image would.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


LABEL_FIELD = pa.field("label", pa.int64())
"""The second column of a classification dataset."""
CAPTION_FIELD = pa.field("caption", pa.string())
"""The second column of a captioned-image dataset."""


def write_rows(
    out: Path, rows: Iterator[tuple[bytes, Any]], metadata: dict[str, str], rows_per_group: int, second=LABEL_FIELD
) -> None:
    """Write ``(image, second column)`` ``rows`` to ``out``, which appears only complete: a conversion that fails
    half-way leaves no valid-looking partial dataset (and an existing ``out`` untouched)."""
    schema = pa.schema([("image", pa.binary()), second], metadata=metadata)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        images: list[bytes] = []
        values: list[Any] = []
        for image, value in rows:
            images.append(image)
            values.append(value)
            if len(images) == rows_per_group:
                writer.write_table(pa.table({"image": images, second.name: values}, schema=schema))
                images, values = [], []
        if images:
            writer.write_table(pa.table({"image": images, second.name: values}, schema=schema))


def inside(path: Path, real_root: Path) -> bool:
    # realpath, unlike Path.resolve on Python 3.11, does not raise on a symlink loop.
    return Path(os.path.realpath(path)).is_relative_to(real_root)


@dataclass
class _Skipped:
    """What a conversion leaves out, each kind named in one warning."""

    hidden: list[Path] = field(default_factory=list)
    """Names starting with ``.`` (``.git``, ``.ipynb_checkpoints``, ``.DS_Store``): tool files, not data."""
    outside: list[Path] = field(default_factory=list)
    """Symlinks pointing outside the root."""
    loops: list[Path] = field(default_factory=list)
    """Folder links pointing at the folder that holds them or one above it (they would be read forever)."""
    loose: list[Path] = field(default_factory=list)
    """Image files directly in the root: in no class folder, so with no label."""
    empty: list[Path] = field(default_factory=list)
    """Class folders that hold no image (they keep their label, so the others' labels do not shift)."""

    def warn(self, root: Path) -> None:
        for paths, what in (
            (self.hidden, "hidden file(s) or folder(s) (names starting with '.')"),
            (self.outside, "symlink(s) pointing outside the folder"),
            (self.loops, "folder link(s) pointing back at a folder above them (a loop)"),
            (self.loose, "image(s) directly in the folder, in no class folder"),
        ):
            if paths:
                warnings.warn(f"{root}: skipped {len(paths)} {what}: {_shown(paths)}", UserWarning, stacklevel=3)
        if self.empty:
            warnings.warn(
                f"{root}: {len(self.empty)} class folder(s) hold no image and keep their labels: {_shown(self.empty)}",
                UserWarning,
                stacklevel=3,
            )


def _shown(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _entries(folder: Path, real_root: Path, skipped: _Skipped) -> Iterator[Path]:
    """The entries of ``folder`` in name order, less the hidden ones and links leaving ``real_root``."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            skipped.hidden.append(entry)
        elif not inside(entry, real_root):
            skipped.outside.append(entry)
        else:
            yield entry


def _images(folder: Path, real_root: Path, above: frozenset[str], skipped: _Skipped) -> Iterator[Path]:
    """The image files under ``folder`` at any depth, in path order; ``above``: the real paths of the folders
    holding it (a link to one of them is a loop, skipped)."""
    for entry in _entries(folder, real_root, skipped):
        if entry.is_dir():
            real = os.path.realpath(entry)
            if real in above:
                skipped.loops.append(entry)
            else:
                yield from _images(entry, real_root, above | {real}, skipped)
        elif entry.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        elif entry.is_file():
            yield entry
        else:
            # Reading a named pipe would block forever; a dangling link has no data to store.
            raise ImageDecodeError(f"{entry}: not a regular file (a dangling symlink, a pipe or a device)")


def _check_class_name(root: Path, name: str) -> None:
    """Refuse a class folder name that would not read back as one class from the ``classes`` metadata."""
    if name.splitlines() != [name]:
        why = "holds a line break (class names are stored one per line, so it would read back as several)"
    else:
        try:
            name.encode("utf-8")
            return
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
            why = "is not valid UTF-8 (the metadata is UTF-8 text)"
    raise ValueError(f"{root}: class folder name {name!r} {why}; rename the folder")


def encoded_image(file: Path) -> bytes:
    """The bytes to store for ``file``: PNG and JPEG as they are, other formats re-encoded as PNG.

    Raises:
        ImageDecodeError: the file does not decode or holds non-finite pixels (the file named).
    """
    try:
        data = file.read_bytes()
        with load_image(data) as im:
            if im.format in ("PNG", "JPEG"):
                return data
            if im.mode not in _PNG_MODES:
                im = im.convert("L" if len(im.getbands()) == 1 else "RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except (OSError, ImageDecodeError) as exc:
        raise ImageDecodeError(f"{file}: {exc}") from exc


def image_folder_to_parquet(root: str | Path, out: str | Path, rows_per_group: int = 1024) -> list[str]:
    """Convert ``root/<class>/<image>`` folders to a Parquet file (label = index of the sorted class name).

    Images in sub-folders of a class folder, at any depth, belong to that class. Every image is decoded on
    the way, so a corrupt file fails here, named, rather than in training. PNG and JPEG files are stored as
    they are; other formats PIL reads are re-encoded as PNG. Skipped with a warning naming them: hidden
    entries (names starting with ``.``: ``.git``, ``.ipynb_checkpoints``), symlinks that point outside
    ``root``, folder links back to a folder above them (loops), and images directly in ``root`` (no class);
    a class folder without images keeps its label, with a warning. Other files (names that do not end in
    an image suffix) are ignored. The file is written only complete.

    Args:
        root: folder of class folders.
        out: the Parquet file to write (columns ``image``: binary, ``label``: int64).
        rows_per_group: images per Parquet row group.

    Returns:
        The class names in label order, also stored in the file's schema metadata under the key
        ``classes``: UTF-8, one name per line.

    Raises:
        ValueError: no class folders or no images, or a class folder name that does not read back as one class.
        ImageDecodeError: a file that does not decode (empty, not an image, truncated) or has NaN/inf pixels.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group must be >= 1, got {rows_per_group}")
    real_root = os.path.realpath(root)
    skipped = _Skipped()
    folders = []
    for entry in _entries(root, Path(real_root), skipped):
        if not entry.is_dir():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                skipped.loose.append(entry)
        elif os.path.realpath(entry) == real_root:
            skipped.loops.append(entry)
        else:
            _check_class_name(root, entry.name)
            folders.append(entry)
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        above = frozenset({real_root, os.path.realpath(folder)})
        found = [(file, label) for file in _images(folder, Path(real_root), above, skipped)]
        if not found:
            skipped.empty.append(folder)
        files += found
    skipped.warn(root)
    if not folders:
        raise ValueError(f"{root} has no class folders (expected root/<class>/<image files>)")
    if not files:
        raise ValueError(f"{root}: the class folders hold no image files ({', '.join(IMAGE_SUFFIXES)})")
    rows = ((encoded_image(file), label) for file, label in files)
    write_rows(Path(out), rows, {"classes": "\n".join(f.name for f in folders)}, rows_per_group)
    return [f.name for f in folders]


def digits_to_parquet(out: str | Path, split: str = "train") -> Path:
    """Write scikit-learn's digits ``split`` (the fixed split of :func:`flops_ray.data.arrays.digits`) as 8x8 PNGs.

    Pixel values 0..16 become 0..255, so reading the file back gives the ``digits()`` arrays up to rounding.
    """
    from PIL import Image

    from flops_ray.data.arrays import digits

    data = digits(split)
    pixels = np.rint((data.x[:, 0] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)

    def rows() -> Iterator[tuple[bytes, int]]:
        for img, label in zip(pixels, data.y):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            yield buf.getvalue(), int(label)

    out = Path(out)
    write_rows(out, rows(), {"classes": "\n".join(str(i) for i in range(10))}, rows_per_group=512)
    return out
