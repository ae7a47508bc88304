"""Synthetic captioned images, made from the seed with no download: coloured shapes at places, and coloured digits.

A shape image is one filled shape (:data:`SHAPES`) of one colour (:data:`COLOURS`) at one place
(:data:`PLACES`) on a dark, noisy background, captioned in words ("a red square at the top left"); a digit image is
one of scikit-learn's 8x8 digits scaled up and drawn in a colour ("a blue seven"). Images are ``(N, 3, S, S)``
uint8, as a photo would be before a vision model's preprocessing; the vision-language applications (alignment,
prompt tuning of a CLIP) caption, classify and pretrain on them.

>>> data = shape_images(4, seed=0, size=32)
>>> data.images.shape, data.images.dtype
((4, 3, 32, 32), dtype('uint8'))
>>> data.captions()[0] == caption(data.shape[0], data.colour[0], data.place[0])
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("square", "circle", "triangle", "cross")
"""Shape names, in label order."""
COLOURS = {"red": (220, 45, 45), "green": (45, 200, 70), "blue": (60, 90, 235), "yellow": (235, 215, 45)}
"""Colour name -> RGB, in label order."""
PLACES = ("at the top left", "at the top right", "at the bottom left", "at the bottom right", "in the centre")
"""Where a shape sits, as the caption says it, in label order."""
_PLACE_CENTRES = ((0.27, 0.27), (0.27, 0.73), (0.73, 0.27), (0.73, 0.73), (0.5, 0.5))
"""Each place's centre as (row, column) fractions of the side."""
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""A digit's caption word, by label."""


@dataclass(frozen=True)
class ShapeImages:
    """Shape images and what each shows (labels index :data:`SHAPES`, :data:`COLOURS`, :data:`PLACES`)."""

    images: np.ndarray
    """``(N, 3, S, S)`` uint8."""
    shape: np.ndarray
    """``(N,)`` int64 shape labels."""
    colour: np.ndarray
    """``(N,)`` int64 colour labels."""
    place: np.ndarray
    """``(N,)`` int64 place labels."""

    def captions(self) -> list[str]:
        """Each image's caption."""
        return [caption(s, c, p) for s, c, p in zip(self.shape, self.colour, self.place)]


def caption(shape: int, colour: int, place: int) -> str:
    """``"a red square at the top left"``: the caption of a shape image's labels."""
    return f"a {list(COLOURS)[colour]} {SHAPES[shape]} {PLACES[place]}"


def _mask(shape: int, size: int, centre: tuple[float, float], half: float) -> np.ndarray:
    """``(S, S)`` bool: the pixels of ``SHAPES[shape]`` of half-width ``half`` around ``centre`` (row, column)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = rows - centre[0], cols - centre[1]
    if SHAPES[shape] == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if SHAPES[shape] == "circle":
        return dy**2 + dx**2 <= half**2
    if SHAPES[shape] == "triangle":  # apex up: the half-width grows from 0 at the top to ``half`` at the base
        return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    bar = half / 3  # a cross: two bars of a third of its half-width
    return ((np.abs(dy) <= half) & (np.abs(dx) <= bar)) | ((np.abs(dx) <= half) & (np.abs(dy) <= bar))


def _background(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``(n, 3, S, S)`` float32 dark noise."""
    return rng.normal(30.0, 12.0, (n, 3, size, size)).astype(np.float32)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def shape_images(n: int, seed: int, size: int = 32) -> ShapeImages:
    """``n`` shape images with labels drawn uniformly and independently, from ``seed`` alone.

    Each shape's size and position jitter a little, and its colour's brightness varies, so no two images of one
    caption are the same.
    """
    rng = np.random.default_rng(seed)
    shape = rng.integers(len(SHAPES), size=n)
    colour = rng.integers(len(COLOURS), size=n)
    place = rng.integers(len(PLACES), size=n)
    images = _background(rng, n, size)
    rgb = np.asarray(list(COLOURS.values()), dtype=np.float32)
    for i in range(n):
        centre = np.asarray(_PLACE_CENTRES[place[i]]) * size + rng.uniform(-0.04, 0.04, 2) * size
        half = size * rng.uniform(0.13, 0.18)
        mask = _mask(int(shape[i]), size, (float(centre[0]), float(centre[1])), half)
        images[i][:, mask] = (rgb[colour[i]] * rng.uniform(0.85, 1.0))[:, None]
    return ShapeImages(_to_uint8(images), shape.astype(np.int64), colour.astype(np.int64), place.astype(np.int64))


def digit_images(split: str, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits of ``split`` (:func:`~flops_ray.data.arrays.digits`) as ``(N, 3, S, S)`` uint8 images,
    each drawn in a colour of :data:`COLOURS` drawn from ``seed``; returns images, digit labels, colour labels."""
    from flops_ray.data.arrays import digits

    data = digits(split, size)
    rng = np.random.default_rng(seed)
    colour = rng.integers(len(COLOURS), size=len(data))
    ink = (data.x[:, 0] + 1.0) / 2.0  # (N, S, S) in [0, 1]
    rgb = np.asarray(list(COLOURS.values()), dtype=np.float32)[colour]  # (N, 3)
    images = _background(rng, len(data), size) * (1 - ink[:, None]) + rgb[:, :, None, None] * ink[:, None]
    return _to_uint8(images), data.y, colour.astype(np.int64)
