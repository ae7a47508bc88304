"""Parquet image datasets: round trip of the digits, folder conversion, schema errors, memory-mapped cache."""

from __future__ import annotations

import io
import os
import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flops_ray.data.arrays import digits
from flops_ray.data.convert import digits_to_parquet, image_folder_to_parquet
from flops_ray.data.images import ImageDecodeError
from flops_ray.data.parquet import DatasetSchemaError, read_parquet


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    return digits_to_parquet(tmp_path_factory.mktemp("pq") / "digits_train.parquet", split="train")


def test_digits_round_trip(digits_file):
    ref = digits("train")
    data = read_parquet(digits_file, img_size=8, in_chans=1)
    assert data.x.shape == ref.x.shape and data.x.dtype == np.float32
    np.testing.assert_array_equal(data.y, ref.y)
    np.testing.assert_allclose(data.x, ref.x, atol=1 / 127.5)  # PNG holds 8-bit pixels


def test_streams_in_row_groups(digits_file):
    assert pq.ParquetFile(digits_file).metadata.num_row_groups > 1


def test_resize_rgb_and_limit(digits_file):
    data = read_parquet(digits_file, img_size=16, in_chans=3, limit=10)
    assert data.x.shape == (10, 3, 16, 16)
    assert np.all(data.x >= -1) and np.all(data.x <= 1)
    np.testing.assert_array_equal(data.x[:, 0], data.x[:, 2])  # gray to RGB copies the channel


def test_memmap_cache_is_reused(digits_file, tmp_path):
    a = read_parquet(digits_file, img_size=8, in_chans=1, cache_dir=tmp_path)
    assert isinstance(a.x, np.memmap)
    b = read_parquet(digits_file, img_size=8, in_chans=1, cache_dir=tmp_path)
    np.testing.assert_array_equal(a.x, b.x)
    assert len(list(tmp_path.glob("*.x.npy"))) == 1


def _png(color: int, size=(5, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (color, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_to_parquet(tmp_path):
    for name, color in (("cat", 255), ("dog", 0)):
        (tmp_path / "root" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "root" / name / f"{i}.png").write_bytes(_png(color))
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "root" / "cat" / "x.bmp")  # re-encoded as PNG
    (tmp_path / "root" / "dog" / "notes.txt").write_text("not an image")
    out = tmp_path / "animals.parquet"
    assert image_folder_to_parquet(tmp_path / "root", out) == ["cat", "dog"]
    data = read_parquet(out, img_size=4, in_chans=3)
    np.testing.assert_array_equal(data.y, [0, 0, 0, 0, 1, 1, 1])
    assert np.allclose(data.x[data.y == 0, 0], 1.0) and np.allclose(data.x[data.y == 1, 0], -1.0)
    assert pq.read_schema(out).metadata[b"classes"] == b"cat\ndog"


def test_hugging_face_image_struct(tmp_path):
    """HF datasets store images as struct<bytes, path>; those read the same."""
    images = pa.array([{"bytes": _png(255), "path": "a.png"}, {"bytes": _png(0), "path": "b.png"}])
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"img": images, "fine_label": pa.array([3, 4], pa.int64())}), path)
    data = read_parquet(path, 4, 3, image_column="img", label_column="fine_label")
    np.testing.assert_array_equal(data.y, [3, 4])


@pytest.mark.parametrize(
    "table, match",
    [
        ({"image": pa.array([_png(1)])}, r"missing column 'label' \(integer\); the file has columns \['image'\]"),
        ({"pixels": pa.array([_png(1)]), "label": pa.array([1])}, r"missing column 'image'"),
        ({"image": pa.array(["a.png"]), "label": pa.array([1])}, r"column 'image' has type string, expected binary"),
        (
            {"image": pa.array([_png(1)]), "label": pa.array(["cat"])},
            r"column 'label' has type string, expected an integer",
        ),
        ({"image": pa.array([_png(1), None]), "label": pa.array([1, 2])}, r"row 1: null entry in column 'image'"),
        ({"image": pa.array([_png(1), _png(2)]), "label": pa.array([None, 2])}, r"row 0: null entry in column 'label'"),
    ],
    ids=["no-label", "no-image", "image-string", "label-string", "null-image", "null-label"],
)
def test_wrong_schema_names_the_column(tmp_path, table, match):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(DatasetSchemaError, match=match):
        read_parquet(path, img_size=8, in_chans=1)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_parquet(tmp_path / "nope.parquet", 8, 1)


def _float_tiff(value: float) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def _folder(root, files: dict[str, bytes]):
    """``root/<class>/<file>`` from ``{"class/file": bytes}``; returns ``root``."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _classes(path) -> list[str]:
    """The class names as a reader of the documented metadata gets them: UTF-8, one per line."""
    return pq.read_schema(path).metadata[b"classes"].decode("utf-8").split("\n")


def test_symlinks_leaving_the_root_are_skipped_and_named(tmp_path):
    outside = _folder(tmp_path / "outside", {"secret/x.png": _png(9)})
    root = _folder(tmp_path / "root", {"cat/0.png": _png(255), "dog/0.png": _png(0)})
    (root / "cat" / "leak.png").symlink_to(outside / "secret" / "x.png")
    (root / "secret").symlink_to(outside / "secret", target_is_directory=True)
    (root / "dog" / "alias.png").symlink_to(root / "cat" / "0.png")  # inside the root: kept
    out = tmp_path / "data.parquet"
    with pytest.warns(UserWarning, match=r"skipped 2 symlink\(s\) pointing outside") as caught:
        assert image_folder_to_parquet(root, out) == ["cat", "dog"]
    message = str(caught[0].message)
    assert str(root / "cat" / "leak.png") in message and str(root / "secret") in message
    data = read_parquet(out, img_size=4, in_chans=3)
    np.testing.assert_array_equal(data.y, [0, 1, 1])
    assert _classes(out) == ["cat", "dog"]


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", r"empty image \(0 bytes\)"),
        (b"just some notes", r"not an image format PIL reads"),
        (_png(200, size=(64, 64))[:60], r"corrupt or truncated image"),
        (_float_tiff(float("nan")), r"16 of 16 pixels are NaN or infinite"),
        (_float_tiff(float("inf")), r"16 of 16 pixels are NaN or infinite"),
    ],
    ids=["empty", "text", "truncated", "nan-tiff", "inf-tiff"],
)
def test_converter_decodes_every_image_and_names_the_bad_file(tmp_path, data, match):
    suffix = ".tif" if data[:2] in (b"II", b"MM") else ".png"
    root = _folder(tmp_path / "root", {"cat/0.png": _png(255), f"dog/bad{suffix}": data})
    out = tmp_path / "data.parquet"
    out.write_bytes(b"an earlier conversion")
    with pytest.raises(ImageDecodeError, match=f"{re.escape(str(root / 'dog' / ('bad' + suffix)))}: {match}"):
        image_folder_to_parquet(root, out)
    # Written only complete: the earlier file stands and no partial file is left beside it.
    assert out.read_bytes() == b"an earlier conversion" and sorted(tmp_path.iterdir()) == [out, root]


def test_finite_float_tiff_is_stored_as_png(tmp_path):
    root = _folder(tmp_path / "root", {"a/0.tif": _float_tiff(2.0), "b/0.png": _png(0)})
    out = tmp_path / "data.parquet"
    image_folder_to_parquet(root, out)
    assert pq.read_table(out)["image"][0].as_py()[:4] == b"\x89PNG"
    np.testing.assert_allclose(read_parquet(out, img_size=4, in_chans=1).x[0], 2.0 / 127.5 - 1.0, atol=1e-6)


def test_pipe_named_like_an_image_fails_instead_of_hanging(tmp_path):
    root = _folder(tmp_path / "root", {"cat/0.png": _png(255)})
    fifo = root / "cat" / "1.png"
    os.mkfifo(fifo)
    # A converter that read the pipe would get these bytes and fail on them, where alone it would block forever.
    writer = threading.Thread(target=fifo.write_bytes, args=(b"not an image",), daemon=True)
    writer.start()
    with pytest.raises(ImageDecodeError, match=r"1.png: not a regular file"):
        image_folder_to_parquet(root, tmp_path / "data.parquet")
    # The writer waits for a reader: one that opens without blocking releases it.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer.join()
    os.close(reader)


@pytest.mark.parametrize(
    "name, match",
    [
        ("two\nlines", "holds a line break"),
        ("carriage\rreturn", "holds a line break"),
        (b"latin\xe9", "not valid UTF-8"),
    ],
    ids=["newline", "carriage-return", "not-utf8"],
)
def test_class_names_that_would_not_read_back_are_refused(tmp_path, name, match):
    root = tmp_path / "root"
    root.mkdir()
    os.mkdir(os.path.join(os.fsencode(root), name if isinstance(name, bytes) else os.fsencode(name)))
    _folder(root, {"cat/0.png": _png(255)})
    with pytest.raises(ValueError, match=f"class folder name .* {match}"):
        image_folder_to_parquet(root, tmp_path / "data.parquet")
    assert not (tmp_path / "data.parquet").exists()


def _parquet(path, images: list[bytes]):
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(range(len(images)))}), path)
    return path


@pytest.mark.parametrize(
    "bad, match",
    [
        (b"not an image", "not an image format PIL reads"),
        (_float_tiff(float("nan")), "16 of 16 pixels are NaN or infinite"),
    ],
    ids=["undecodable", "nan"],
)
def test_reading_names_the_file_and_row_of_a_bad_image(tmp_path, bad, match):
    path = _parquet(tmp_path / "bad.parquet", [_png(1), _png(2), _png(3), bad, _png(4)])
    with pytest.raises(ImageDecodeError, match=f"{re.escape(str(path))}: row 3: {match}"):
        read_parquet(path, img_size=4, in_chans=3)
