"""Writing Parquet image datasets: an image folder (one subfolder per class) or scikit-learn's digits.

The files have the columns ``image`` (PNG/JPEG bytes) and ``label`` (int64) that
:func:`flops_ray.data.parquet.read_parquet` reads, and are written only complete.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flops_ray.data.images import ImageDecodeError, load_image
from flops_ray.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Modes PNG stores as they are; others are converted to 8-bit gray (one band) or RGB, as decode_image would.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


def _write_rows(out: Path, rows: Iterator[tuple[bytes, int]], metadata: dict[str, str], rows_per_group: int) -> None:
    """Write ``rows`` to ``out``, which appears only complete: a conversion that fails half-way leaves
    no valid-looking partial dataset (and an existing ``out`` untouched)."""
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())], metadata=metadata)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        images: list[bytes] = []
        labels: list[int] = []
        for image, label in rows:
            images.append(image)
            labels.append(label)
            if len(images) == rows_per_group:
                writer.write_table(pa.table({"image": images, "label": labels}, schema=schema))
                images, labels = [], []
        if images:
            writer.write_table(pa.table({"image": images, "label": labels}, schema=schema))


def _inside(path: Path, real_root: Path) -> bool:
    # realpath, unlike Path.resolve on Python 3.11, does not raise on a symlink loop.
    return Path(os.path.realpath(path)).is_relative_to(real_root)


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


def _encoded_image(file: Path) -> bytes:
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


def _warn_skipped(root: Path, links: list[Path]) -> None:
    if links:
        shown = ", ".join(str(p) for p in links[:5]) + (f" and {len(links) - 5} more" if len(links) > 5 else "")
        warnings.warn(
            f"{root}: skipped {len(links)} symlink(s) pointing outside the folder: {shown}", UserWarning, stacklevel=3
        )


def image_folder_to_parquet(root: str | Path, out: str | Path, rows_per_group: int = 1024) -> list[str]:
    """Convert ``root/<class>/<image>`` folders to a Parquet file (label = index of the sorted class name).

    Every image is decoded on the way, so a corrupt file fails here, named, rather than in training.
    PNG and JPEG files are stored as they are; other formats PIL reads are re-encoded as PNG. Symlinks
    that point outside ``root`` (class folders or files) are skipped with a warning naming them; other
    entries whose names do not end in an image suffix are ignored. The file is written only complete.

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
    real_root = Path(os.path.realpath(root))
    outside: list[Path] = []
    folders = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        if not _inside(folder, real_root):
            outside.append(folder)
            continue
        _check_class_name(root, folder.name)
        folders.append(folder)
    if not folders:
        _warn_skipped(root, outside)
        raise ValueError(f"{root} has no class folders (expected root/<class>/<image files>)")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not _inside(file, real_root):
                outside.append(file)
            elif file.is_file():
                files.append((file, label))
            elif not file.is_dir():
                # Reading a named pipe would block forever; a dangling link has no data to store.
                raise ImageDecodeError(f"{file}: not a regular file (a dangling symlink, a pipe or a device)")
    _warn_skipped(root, outside)
    if not files:
        raise ValueError(f"{root}: the class folders hold no image files ({', '.join(IMAGE_SUFFIXES)})")
    rows = ((_encoded_image(file), label) for file, label in files)
    _write_rows(Path(out), rows, {"classes": "\n".join(f.name for f in folders)}, rows_per_group)
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
    _write_rows(out, rows(), {"classes": "\n".join(str(i) for i in range(10))}, rows_per_group=512)
    return out
