"""Parquet image datasets: round trip of the digits, folder conversion, schema errors, memory-mapped cache."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flops_ray.data import digits
from flops_ray.parquet_data import (
    DatasetSchemaError,
    digits_to_parquet,
    image_folder_to_parquet,
    read_parquet,
)


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
        ({"image": pa.array([_png(1), None]), "label": pa.array([1, 2])}, r"null entries"),
    ],
    ids=["no-label", "no-image", "image-string", "label-string", "nulls"],
)
def test_wrong_schema_names_the_column(tmp_path, table, match):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(DatasetSchemaError, match=match):
        read_parquet(path, img_size=8, in_chans=1)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_parquet(tmp_path / "nope.parquet", 8, 1)
