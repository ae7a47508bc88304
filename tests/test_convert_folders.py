"""The image-folder converter on folders as users have them: nested, with tool files, with links that loop."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flops_ray.app.cli import main
from flops_ray.data.convert import image_folder_to_parquet


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (color, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, files: dict[str, int]):
    """``root`` holding ``{"class/.../file.png": red level}``."""
    for name, color in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(color))
    return root


def _table(out) -> tuple[list[int], list[int]]:
    """``(labels, red levels)`` of a converted file, row by row."""
    table = pq.read_table(out)
    reds = [np.asarray(Image.open(io.BytesIO(b)))[0, 0, 0].item() for b in table["image"].to_pylist()]
    return table["label"].to_pylist(), reds


def test_images_in_sub_folders_belong_to_their_top_level_class(tmp_path):
    root = _folder(
        tmp_path / "root",
        {"cat/0.png": 10, "cat/indoor/1.png": 11, "cat/indoor/sofa/2.png": 12, "dog/park/3.png": 20, "dog/4.png": 21},
    )
    out = tmp_path / "data.parquet"
    assert image_folder_to_parquet(root, out) == ["cat", "dog"]
    assert _table(out) == ([0, 0, 0, 1, 1], [10, 11, 12, 21, 20])


def test_hidden_folders_and_files_are_skipped_with_a_warning(tmp_path):
    root = _folder(
        tmp_path / "root",
        {
            "cat/0.png": 10,
            "dog/1.png": 20,
            ".git/objects/x.png": 1,
            ".ipynb_checkpoints/y.png": 2,
            "cat/.ipynb_checkpoints/0-checkpoint.png": 3,
            "dog/._1.png": 4,
        },
    )
    out = tmp_path / "data.parquet"
    with pytest.warns(UserWarning, match=r"skipped 4 hidden file\(s\) or folder\(s\)") as caught:
        assert image_folder_to_parquet(root, out) == ["cat", "dog"]
    message = str(caught[0].message)
    for name in (".git", ".ipynb_checkpoints", "cat/.ipynb_checkpoints", "dog/._1.png"):
        assert str(root / name) in message
    assert _table(out) == ([0, 1], [10, 20])


def test_folder_links_that_loop_are_skipped_by_name(tmp_path):
    root = _folder(tmp_path / "root", {"cat/0.png": 10, "dog/1.png": 20})
    (root / "everything").symlink_to(root, target_is_directory=True)
    (root / "cat" / "up").symlink_to(root, target_is_directory=True)
    (root / "dog" / "again").symlink_to(root / "dog", target_is_directory=True)
    out = tmp_path / "data.parquet"
    with pytest.warns(UserWarning, match=r"skipped 3 folder link\(s\) pointing back at a folder above them") as caught:
        assert image_folder_to_parquet(root, out) == ["cat", "dog"]
    assert all(str(root / p) in str(caught[0].message) for p in ("everything", "cat/up", "dog/again"))
    assert _table(out) == ([0, 1], [10, 20])


def test_loose_images_and_empty_classes_are_named(tmp_path):
    root = _folder(tmp_path / "root", {"cat/0.png": 10, "stray.png": 1})
    (root / "dog").mkdir()
    out = tmp_path / "data.parquet"
    with pytest.warns(UserWarning) as caught:
        assert image_folder_to_parquet(root, out) == ["cat", "dog"]
    messages = [str(w.message) for w in caught]
    assert f"{root}: skipped 1 image(s) directly in the folder, in no class folder: {root / 'stray.png'}" in messages
    assert f"{root}: 1 class folder(s) hold no image and keep their labels: {root / 'dog'}" in messages


def test_convert_states_classes_and_counts(tmp_path, capsys):
    root = _folder(tmp_path / "root", {"cat/0.png": 1, "cat/a/1.png": 2, "cat/a/b/2.png": 3, "dog/3.png": 4})
    _folder(root, {".ipynb_checkpoints/x.png": 5})
    out = tmp_path / "data.parquet"
    assert main(["convert", str(root), str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}: 4 images in 2 classes: cat 3, dog 1\n"
    assert captured.err == (
        f"warning: {root}: skipped 1 hidden file(s) or folder(s) (names starting with '.'): {root / '.ipynb_checkpoints'}\n"
    )
