"""Reading Parquet image datasets: a column of encoded images (PNG/JPEG bytes) and a column of integer labels.

Files are read in streaming record batches (``ParquetFile.iter_batches``), decoded with PIL, resized to
the model's side and scaled to ``[-1, 1]`` (:func:`flops_ray.data.images.decode_image`). With ``cache_dir``
the decoded array lives in a memory-mapped file, so a dataset larger than memory still trains.

>>> import tempfile, pathlib
>>> from flops_ray.data.convert import digits_to_parquet
>>> path = digits_to_parquet(pathlib.Path(tempfile.mkdtemp()) / "digits_test.parquet", split="test")
>>> data = read_parquet(path, img_size=8, in_chans=1)
>>> data.x.shape, data.y.dtype.name
((360, 1, 8, 8), 'int64')
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flops_ray.data.arrays import ArrayDataset

# Re-exported for jobs/reproduce.py and the docs, which import the converter from here.
from flops_ray.data.convert import image_folder_to_parquet as image_folder_to_parquet
from flops_ray.data.images import ImageDecodeError, decode_image
from flops_ray.files import atomic_path


class DatasetSchemaError(ValueError):
    """A Parquet file lacks a column or has one of the wrong type; the message names it."""


def is_image_type(t: pa.DataType) -> bool:
    """Whether a column of type ``t`` holds encoded images: binary, or Hugging Face's ``struct<bytes, path>``."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    # Hugging Face's Image feature: struct<bytes: binary, path: string>.
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and is_image_type(t.field("bytes").type)


def check_schema(schema: pa.Schema, image_column: str = "image", label_column: str = "label", where: str = "") -> None:
    """Raise :class:`DatasetSchemaError` naming the missing or mistyped column."""
    names = schema.names
    for col, kind in ((image_column, "binary (encoded PNG/JPEG bytes)"), (label_column, "integer")):
        if col not in names:
            raise DatasetSchemaError(f"{where}missing column {col!r} ({kind}); the file has columns {names}")
    t = schema.field(image_column).type
    if not is_image_type(t):
        raise DatasetSchemaError(f"{where}column {image_column!r} has type {t}, expected binary (PNG/JPEG bytes)")
    t = schema.field(label_column).type
    if not pa.types.is_integer(t):
        raise DatasetSchemaError(f"{where}column {label_column!r} has type {t}, expected an integer type")


def image_bytes(column: pa.Array) -> list[bytes]:
    """The encoded images of an image column (:func:`is_image_type`)."""
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
        images = image_bytes(batch.column(image_column))
        labels = batch.column(label_column).to_pylist()
        for column, values in ((image_column, images), (label_column, labels)):
            if None in values:
                raise DatasetSchemaError(f"{path}: row {start + values.index(None)}: null entry in column {column!r}")
        yield images, np.asarray(labels, dtype=np.int64)
        start += len(labels)


def _cache_stem(path: Path, cache_dir: Path, shape: tuple[int, ...], image_column: str) -> str:
    """``cache_dir/<name>-<key>``, the key changing with the file (path, size, mtime) and the decoding settings."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{shape}|{image_column}".encode())
    return str(cache_dir / f"{path.stem}-{key.hexdigest()[:16]}")


def _decode_into(x: np.ndarray, path: Path, in_chans: int, image_column: str, label_column: str) -> np.ndarray:
    """Decode the first ``len(x)`` rows of ``path`` into ``x``; returns their labels."""
    n, img_size = len(x), x.shape[-1]
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
    return y


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
    if cache_dir is None:
        x = np.empty(shape, dtype=np.float32)
        return ArrayDataset(x, _decode_into(x, path, in_chans, image_column, label_column))
    stem = _cache_stem(path, Path(cache_dir), shape, image_column)
    # The labels file is written last, whole or not at all: its presence marks a complete cache.
    done = Path(f"{stem}.labels.npy")
    if done.is_file():
        return ArrayDataset(np.load(f"{stem}.x.npy", mmap_mode="r"), np.load(done))
    done.parent.mkdir(parents=True, exist_ok=True)
    x = np.lib.format.open_memmap(f"{stem}.x.npy", mode="w+", dtype=np.float32, shape=shape)
    y = _decode_into(x, path, in_chans, image_column, label_column)
    x.flush()
    with atomic_path(done) as tmp, open(tmp, "wb") as f:
        np.save(f, y)
    return ArrayDataset(x, y)
