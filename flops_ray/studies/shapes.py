"""A generated image set of five shapes, written as Parquet by the image-folder converter: Table 1's second dataset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flops_ray.data.convert import image_folder_to_parquet

SHAPES = ("bar", "circle", "cross", "ring", "triangle")
"""Classes of the generated set, in label order (the image-folder converter sorts class names)."""


def draw_shape(kind: str, rng: np.random.Generator, side: int = 32) -> Image.Image:
    """One greyscale ``side`` px image of ``kind`` with random size, position, rotation, brightness and noise.

    Drawn at 32 px and shrunk (with antialiasing) to the model's 8 px by the Parquet reader, like the
    paper's images resized to the ViT's input.
    """
    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    r = rng.uniform(0.3, 0.45) * side
    cx, cy = side / 2 + rng.uniform(-0.12, 0.12, 2) * side
    angle = rng.uniform(0, 2 * math.pi)
    fill = int(rng.uniform(150, 255))
    width = max(2, int(rng.uniform(0.12, 0.2) * side))

    def spoke(a: float) -> list[tuple[float, float]]:
        return [(cx - r * math.cos(a), cy - r * math.sin(a)), (cx + r * math.cos(a), cy + r * math.sin(a))]

    if kind == "bar":
        draw.line(spoke(angle), fill=fill, width=width)
    elif kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "cross":
        draw.line(spoke(angle), fill=fill, width=width)
        draw.line(spoke(angle + math.pi / 2), fill=fill, width=width)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    elif kind == "triangle":
        draw.polygon(
            [
                (cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
                for k in range(3)
            ],
            fill=fill,
        )
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")
    noisy = np.asarray(im, np.float32) + rng.normal(0.0, 10.0, (side, side))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_shapes(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Generate the shapes set as ``root/<split>/<class>/*.png`` and convert each split to Parquet.

    Returns:
        ``root/shapes_train.parquet``; its test split is the sibling ``shapes_test.parquet``.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            kind = SHAPES[i % len(SHAPES)]
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            draw_shape(kind, rng).save(folder / f"{i:05d}.png")
        image_folder_to_parquet(root / split, root / f"shapes_{split}.parquet")
    return root / "shapes_train.parquet"
