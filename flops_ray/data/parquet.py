"""Parquet image datasets: a column of encoded images (PNG/JPEG bytes) and a column of integer labels.

Files are read in streaming record batches (``ParquetFile.iter_batches``), decoded with PIL, resized to
the model's side and scaled to ``[-1, 1]`` (the convention of :func:`flops_ray.data.arrays.digits` and of
timm's ViT weights, mean = std = 0.5). With ``cache_dir`` the decoded array lives in a memory-mapped
file, so a dataset larger than memory (CIFAR-100 at 224 px is 30 GB of float32) still trains.

>>> import tempfile, pathlib
>>> path = digits_to_parquet(pathlib.Path(tempfile.mkdtemp()) / "digits_test.parquet", split="test")
>>> data = read_parquet(path, img_size=8, in_chans=1)
>>> data.x.shape, data.y.dtype.name
((360, 1, 8, 8), 'int64')
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flops_ray.data.arrays import ArrayDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetSchemaError(ValueError):
    """A Parquet file lacks a column or has one of the wrong type; the message names it."""


class ImageDecodeError(ValueError):
    """An image that does not decode or holds non-finite pixels; the message names its file (and row)."""


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    # Hugging Face's Image feature: struct<bytes: binary, path: string>.
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_image_type(t.field("bytes").type)


def check_schema(schema: pa.Schema, image_column: str = "image", label_column: str = "label", where: str = "") -> None:
    """Raise :class:`DatasetSchemaError` naming the missing or mistyped column."""
    names = schema.names
    for col, kind in ((image_column, "binary (encoded PNG/JPEG bytes)"), (label_column, "integer")):
        if col not in names:
            raise DatasetSchemaError(f"{where}missing column {col!r} ({kind}); the file has columns {names}")
    t = schema.field(image_column).type
    if not _is_image_type(t):
        raise DatasetSchemaError(f"{where}column {image_column!r} has type {t}, expected binary (PNG/JPEG bytes)")
    t = schema.field(label_column).type
    if not pa.types.is_integer(t):
        raise DatasetSchemaError(f"{where}column {label_column!r} has type {t}, expected an integer type")


def _load_image(data: bytes):
    """Fully decoded PIL image of ``data``: a truncated file fails here, not half-way through training.

    Raises:
        ImageDecodeError: empty, unreadable or truncated bytes, or a float image with NaN or infinite pixels.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("empty image (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not an image format PIL reads ({len(data)} bytes)") from exc
    except Exception as exc:  # PIL's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error...
        raise ImageDecodeError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    # Only float images ("F") can hold NaN or inf; converted to 8 bits they would read as -1 and +1.
    if im.mode == "F":
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(im))))
        if bad:
            raise ImageDecodeError(f"{bad} of {im.width * im.height} pixels are NaN or infinite")
    return im


def decode_image(data: bytes, img_size: int, in_chans: int) -> np.ndarray:
    """Encoded image bytes -> ``(C, H, W)`` float32 in ``[-1, 1]``, resized to ``img_size`` square.

    Raises:
        ImageDecodeError: the bytes do not decode, or the image holds NaN or infinite pixels.
    """
    from PIL import Image

    with _load_image(data) as im:
        im = im.convert("L" if in_chans == 1 else "RGB")
        if im.size != (img_size, img_size):
            im = im.resize((img_size, img_size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr[None] if in_chans == 1 else arr.transpose(2, 0, 1)


def _image_bytes(column: pa.Array) -> list[bytes]:
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def iter_parquet(
    path: str | Path, image_column: str = "image", label_column: str = "label", batch_rows: int = 1024
) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """Stream ``(encoded images, labels)`` record batches of a Parquet file (schema checked first)."""
    pf = pq.ParquetFile(path)
    check_schema(pf.schema_arrow, image_column, label_column, where=f"{path}: ")
    start = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[image_column, label_column]):
        images = _image_bytes(batch.column(image_column))
        labels = batch.column(label_column).to_pylist()
        for column, values in ((image_column, images), (label_column, labels)):
            if None in values:
                raise DatasetSchemaError(f"{path}: row {start + values.index(None)}: null entry in column {column!r}")
        yield images, np.asarray(labels, dtype=np.int64)
        start += len(labels)


def read_parquet(
    path: str | Path,
    img_size: int,
    in_chans: int,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | Path | None = None,
    limit: int | None = None,
) -> ArrayDataset:
    """Decode a Parquet image dataset into an :class:`~flops_ray.data.arrays.ArrayDataset`.

    Args:
        path: the Parquet file.
        img_size: side the images are resized to.
        in_chans: 1 (grayscale) or 3 (RGB).
        image_column, label_column: column names.
        cache_dir: if set, decode into a memory-mapped ``.npy`` there (reused when the file and
            settings are unchanged), so the images need not fit in memory.
        limit: read only the first ``limit`` rows (quick runs).

    Raises:
        DatasetSchemaError: a missing or mistyped column, or a null entry (the row named).
        ImageDecodeError: a row whose bytes do not decode or whose pixels are not finite (file and row named).
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist")
    pf = pq.ParquetFile(path)
    check_schema(pf.schema_arrow, image_column, label_column, where=f"{path}: ")
    n = pf.metadata.num_rows if limit is None else min(limit, pf.metadata.num_rows)
    shape = (n, in_chans, img_size, img_size)
    cache = None
    if cache_dir is not None:
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{shape}|{image_column}".encode())
        cache = Path(cache_dir) / f"{path.stem}-{key.hexdigest()[:16]}"
        if (cache.with_suffix(".labels.npy")).is_file():
            return ArrayDataset(
                np.load(cache.with_suffix(".x.npy"), mmap_mode="r"), np.load(cache.with_suffix(".labels.npy"))
            )
        cache.parent.mkdir(parents=True, exist_ok=True)
        x = np.lib.format.open_memmap(cache.with_suffix(".x.npy"), mode="w+", dtype=np.float32, shape=shape)
    else:
        x = np.empty(shape, dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    pos = 0
    for images, labels in iter_parquet(path, image_column, label_column):
        take = min(len(labels), n - pos)
        for i in range(take):
            try:
                x[pos + i] = decode_image(images[i], img_size, in_chans)
            except ImageDecodeError as exc:
                raise ImageDecodeError(f"{path}: row {pos + i}: {exc}") from exc
        y[pos : pos + take] = labels[:take]
        pos += take
        if pos == n:
            break
    if cache is not None:
        x.flush()
        # The labels file is written last: its presence marks a complete cache.
        np.save(cache.with_suffix(".labels.npy"), y)
    return ArrayDataset(x, y)


def _write_rows(out: Path, rows: Iterator[tuple[bytes, int]], metadata: dict[str, str], rows_per_group: int) -> int:
    """Write ``rows`` to ``out`` and return their number; ``out`` appears only complete and with rows.

    The file is written beside ``out`` and renamed into place, so a conversion that fails half-way
    leaves no valid-looking partial dataset (and an existing ``out`` untouched).
    """
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())], metadata=metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            images: list[bytes] = []
            labels: list[int] = []
            for image, label in rows:
                images.append(image)
                labels.append(label)
                if len(images) == rows_per_group:
                    writer.write_table(pa.table({"image": images, "label": labels}, schema=schema))
                    n += len(images)
                    images, labels = [], []
            if images:
                writer.write_table(pa.table({"image": images, "label": labels}, schema=schema))
                n += len(images)
        if n:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n


# Modes PNG stores as they are; others are converted to 8-bit gray (one band) or RGB, as decode_image would.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


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
        with _load_image(data) as im:
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
    rows = ((_encoded_image(file), label) for file, label in files)
    if _write_rows(Path(out), rows, {"classes": "\n".join(f.name for f in folders)}, rows_per_group) == 0:
        raise ValueError(f"{root}: the class folders hold no image files ({', '.join(IMAGE_SUFFIXES)})")
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
