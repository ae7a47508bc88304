"""Parquet image datasets: a column of encoded images (PNG/JPEG bytes) and a column of integer labels.

Files are read in streaming record batches (``ParquetFile.iter_batches``), decoded with PIL, resized to
the model's side and scaled to ``[-1, 1]`` (the convention of :func:`flops_ray.data.digits` and of
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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flops_ray.data import ArrayDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetSchemaError(ValueError):
    """A Parquet file lacks a column or has one of the wrong type; the message names it."""


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


def decode_image(data: bytes, img_size: int, in_chans: int) -> np.ndarray:
    """Encoded image bytes -> ``(C, H, W)`` float32 in ``[-1, 1]``, resized to ``img_size`` square."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
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
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[image_column, label_column]):
        images = _image_bytes(batch.column(image_column))
        labels = batch.column(label_column)
        if labels.null_count or any(b is None for b in images):
            raise DatasetSchemaError(f"{path}: null entries in column {image_column!r} or {label_column!r}")
        yield images, labels.to_numpy().astype(np.int64)


def read_parquet(
    path: str | Path,
    img_size: int,
    in_chans: int,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | Path | None = None,
    limit: int | None = None,
) -> ArrayDataset:
    """Decode a Parquet image dataset into an :class:`~flops_ray.data.ArrayDataset`.

    Args:
        path: the Parquet file.
        img_size: side the images are resized to.
        in_chans: 1 (grayscale) or 3 (RGB).
        image_column, label_column: column names.
        cache_dir: if set, decode into a memory-mapped ``.npy`` there (reused when the file and
            settings are unchanged), so the images need not fit in memory.
        limit: read only the first ``limit`` rows (quick runs).

    Raises:
        DatasetSchemaError: a missing or mistyped column, or null entries.
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
            x[pos + i] = decode_image(images[i], img_size, in_chans)
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
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())], metadata=metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with pq.ParquetWriter(out, schema) as writer:
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
    return n


def image_folder_to_parquet(root: str | Path, out: str | Path, rows_per_group: int = 1024) -> list[str]:
    """Convert ``root/<class>/<image>`` folders to a Parquet file (label = index of the sorted class name).

    PNG and JPEG files are stored as they are; other formats PIL reads are re-encoded as PNG.

    Returns:
        The class names in label order (also stored in the file's schema metadata, key ``classes``).
    """
    from PIL import Image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders (expected root/<class>/<image files>)")

    def rows() -> Iterator[tuple[bytes, int]]:
        for label, name in enumerate(classes):
            for file in sorted((root / name).iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                data = file.read_bytes()
                if file.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                    buf = io.BytesIO()
                    with Image.open(io.BytesIO(data)) as im:
                        im.save(buf, format="PNG")
                    data = buf.getvalue()
                yield data, label

    if _write_rows(Path(out), rows(), {"classes": "\n".join(classes)}, rows_per_group) == 0:
        raise ValueError(f"{root}: the class folders hold no image files ({', '.join(IMAGE_SUFFIXES)})")
    return classes


def digits_to_parquet(out: str | Path, split: str = "train") -> Path:
    """Write scikit-learn's digits ``split`` (the fixed split of :func:`flops_ray.data.digits`) as 8x8 PNGs.

    Pixel values 0..16 become 0..255, so reading the file back gives the ``digits()`` arrays up to rounding.
    """
    from PIL import Image

    from flops_ray.data import digits

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
