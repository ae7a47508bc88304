"""Captioned-image datasets for aligning a vision encoder to a causal LM: Parquet ``image`` + ``caption`` columns in,
one int64 row per sample out.

A sample is ``x (3*S*S + 2*T,)`` int64: the image's RGB pixels ``(3, S, S)`` as they were decoded (0-255, the vision
model normalises them), then the token ids ``(T,)`` and each token's role ``(T,)``: :data:`PAD`, :data:`CONTEXT`
(read, not scored), :data:`CAPTION` (scored: the caption's tokens and the end-of-sequence token after them) or
:data:`IMAGE` (a slot the model fills with a visual token). The sequence is the tokenizer's leading special tokens
(a Llama BOS), ``k`` image slots, the instruction's tokens, the caption's, EOS, then pads to the longest of the file.
Integers keep the image exact under any precision and let one tensor carry image and text through the farm.
:func:`captions_to_parquet` writes such a file from a captions file and the images it names (LCS558K's JSON).

>>> import numpy as np
>>> x = pack(np.zeros((2, 3, 4, 4), np.uint8), np.ones((2, 5), np.int64), np.full((2, 5), CAPTION))
>>> x.shape
(2, 58)
>>> [tuple(t.shape) for t in unpack(torch.from_numpy(x), image_size=4)]
[(2, 3, 4, 4), (2, 5), (2, 5)]
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flops_ray.data.arrays import ArrayDataset
from flops_ray.data.convert import CAPTION_FIELD, encoded_image, inside, write_rows
from flops_ray.data.images import ImageDecodeError, load_image
from flops_ray.data.parquet import DatasetSchemaError, image_bytes, is_image_type
from flops_ray.data.text import Tokenizer, pad_id
from flops_ray.files import atomic_path

PAD, CONTEXT, CAPTION, IMAGE = 0, 1, 2, 3
"""Token roles (the second half of a sample's text)."""


def pack(images: np.ndarray, ids: np.ndarray, roles: np.ndarray) -> np.ndarray:
    """``images (N, 3, S, S)`` uint8, ``ids (N, T)``, ``roles (N, T)`` -> ``x (N, 3*S*S + 2*T)`` int64."""
    return np.concatenate([images.reshape(len(images), -1), ids, roles], axis=1).astype(np.int64)


def unpack(x: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (B, 3*S*S + 2*T)`` -> pixels ``(B, 3, S, S)`` (int64, 0-255), ids ``(B, T)`` and roles ``(B, T)``."""
    pixels = 3 * image_size * image_size
    text = (x.shape[1] - pixels) // 2
    if text <= 0 or pixels + 2 * text != x.shape[1]:
        raise ValueError(
            f"a captioned sample of {image_size}x{image_size} images has 3*S*S + 2*T values, got {x.shape}"
        )
    return x[:, :pixels].view(-1, 3, image_size, image_size), x[:, pixels : pixels + text], x[:, pixels + text :]


def tokenise_captions(
    captions: list[str], tokenizer: Tokenizer, visual_tokens: int, instruction: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and roles ``(N, T)`` of ``captions`` laid out as the module docstring says.

    Raises:
        DatasetSchemaError: a caption that tokenises to nothing (row named).
    """
    specials = tokenizer([""], add_special_tokens=True)["input_ids"][0]  # a Llama BOS; nothing for GPT-2
    told = tokenizer([instruction], add_special_tokens=False)["input_ids"][0] if instruction else []
    words = tokenizer(captions, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = pad_id(tokenizer)
    head = len(specials) + visual_tokens + len(told)
    length = head + max(len(w) for w in words) + len(eos)
    ids = np.full((len(captions), length), pad, dtype=np.int64)
    roles = np.full((len(captions), length), PAD, dtype=np.int64)
    for i, caption in enumerate(words):
        if not caption:
            raise DatasetSchemaError(f"row {i}: its caption {captions[i]!r} tokenises to nothing")
        ids[i, : head + len(caption) + len(eos)] = [*specials, *[pad] * visual_tokens, *told, *caption, *eos]
        roles[i, : len(specials)] = CONTEXT
        roles[i, len(specials) : len(specials) + visual_tokens] = IMAGE
        roles[i, len(specials) + visual_tokens : head] = CONTEXT
        roles[i, head : head + len(caption) + len(eos)] = CAPTION
    return ids, roles


def decode_rgb(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> ``(3, S, S)`` uint8 RGB, resized (bicubic, as CLIP's preprocessing) to ``S`` square."""
    from PIL import Image

    with load_image(data) as im:
        im = im.convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def read_caption_rows(path: str | Path, limit: int = 0) -> tuple[list[bytes], list[str]]:
    """Encoded images and captions of a Parquet file with columns ``image`` and ``caption`` (the first ``limit``
    rows; 0: all).

    Raises:
        DatasetSchemaError: a missing or mistyped column, a null entry, or no rows.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist")
    table = pq.read_table(path)
    names = table.schema.names
    for column, kind, ok in (("image", "binary (PNG/JPEG bytes)", is_image_type), ("caption", "string", _is_text)):
        if column not in names:
            raise DatasetSchemaError(f"{path}: missing column {column!r} ({kind}); the file has columns {names}")
        if not ok(table.schema.field(column).type):
            raise DatasetSchemaError(f"{path}: column {column!r} has type {table.schema.field(column).type}, {kind}")
    table = table.slice(0, limit) if limit else table
    images, captions = image_bytes(table.column("image").combine_chunks()), table.column("caption").to_pylist()
    for column, values in (("image", images), ("caption", captions)):
        if None in values:
            raise DatasetSchemaError(f"{path}: row {values.index(None)}: null entry in column {column!r}")
    if not captions:
        raise DatasetSchemaError(f"{path}: no rows")
    return images, captions


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def read_captions(
    path: str | Path, tokenizer: Tokenizer, image_size: int, visual_tokens: int, instruction: str = "", limit: int = 0
) -> tuple[ArrayDataset, list[str]]:
    """A captioned-image Parquet file as samples ``x (N, 3*S*S + 2*T)`` with targets ``y = 0`` (the caption is the
    only candidate), and its captions.

    Raises:
        DatasetSchemaError: see :func:`read_caption_rows` and :func:`tokenise_captions` (file and row named).
        ImageDecodeError: an image that does not decode (file and row named).
    """
    encoded, captions = read_caption_rows(path, limit)
    images = np.empty((len(encoded), 3, image_size, image_size), dtype=np.uint8)
    for i, data in enumerate(encoded):
        try:
            images[i] = decode_rgb(data, image_size)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{path}: row {i}: {exc}") from exc
    try:
        ids, roles = tokenise_captions(captions, tokenizer, visual_tokens, instruction)
    except DatasetSchemaError as exc:
        raise DatasetSchemaError(f"{path}: {exc}") from exc
    return ArrayDataset(pack(images, ids, roles), np.zeros(len(captions), dtype=np.int64)), captions


def encode_png(image: np.ndarray) -> bytes:
    """``(3, S, S)`` uint8 -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_captions(path: str | Path, images: np.ndarray, captions: list[str], **columns: Any) -> Path:
    """Write ``images (N, 3, S, S)`` uint8 as PNG bytes beside their ``captions`` (and any other ``columns``) to a
    Parquet file, atomically; returns its path."""
    path = Path(path)
    table = pa.table({"image": [encode_png(im) for im in images], "caption": captions, **columns})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_caption_file(path: str | Path) -> list[tuple[str, str]]:
    """``(image path, caption)`` rows of a captions file: JSON lines ``{"image": ..., "caption": ...}``, or a JSON
    list in LLaVA's format (LCS558K's ``blip_laion_cc_sbu_558k.json``), whose entries hold ``image`` and
    ``conversations``, the caption being the first ``"from": "gpt"`` turn.

    Raises:
        ValueError: a row without an image path or a caption (the row named), or a file that is neither.
    """
    path = Path(path)
    text = path.read_text()
    try:
        entries = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: neither JSON lines nor a JSON list ({exc})") from exc
    rows = []
    for i, entry in enumerate(entries):
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and caption is None:
            turns = entry.get("conversations") or []
            caption = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
            raise ValueError(f'{path}: row {i} needs an image path and a caption ("caption", or a "gpt" turn)')
        rows.append((image, caption.strip()))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def captions_to_parquet(
    captions: str | Path, root: str | Path, out: str | Path, rows_per_group: int = 1024, test_rows: int = 0
) -> tuple[Path, ...]:
    """Convert a captions file (:func:`read_caption_file`) and the images it names, relative to ``root``, to a
    Parquet file with the columns ``image`` and ``caption`` (:func:`flops_ray.data.captions.read_captions` reads
    it); with ``test_rows`` the file's last rows go instead to the sibling test file (``out`` with ``train``
    replaced by ``test`` in its name). Every image is decoded on the way; files are written only complete.

    Returns:
        The files written.

    Raises:
        ValueError: a malformed captions file, an image path that leads outside ``root`` or to no file (the row
            named), or ``test_rows`` with no ``train`` in ``out``'s name or not fewer than the rows.
        ImageDecodeError: an image that does not decode.
    """
    rows = read_caption_file(captions)
    root, out = Path(root), Path(out)
    real_root = Path(os.path.realpath(root))
    files = []
    for i, (image, caption) in enumerate(rows):
        file = root / image
        if not inside(file, real_root) or not file.is_file():
            where = "leads outside" if not inside(file, real_root) else "is no file in"
            raise ValueError(f"{captions}: row {i}: image {image!r} {where} {root}")
        files.append((file, caption))
    if test_rows and ("train" not in out.name or test_rows >= len(files)):
        raise ValueError(f"test_rows: needs 'train' in the output's name and fewer than {len(files)} rows, got {out}")
    splits = [(out, files[: len(files) - test_rows])]
    if test_rows:
        splits.append((out.with_name(out.name.replace("train", "test")), files[len(files) - test_rows :]))
    for path, part in splits:
        write_rows(path, ((encoded_image(f), c) for f, c in part), {}, rows_per_group, CAPTION_FIELD)
    return tuple(path for path, _ in splits)
