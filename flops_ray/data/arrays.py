"""Datasets as in-memory arrays, and a deterministic batch order derived from the root seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flops_ray.seeding import STREAM_DATA, generator


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs ``(N, ...)`` (images: ``(N, C, H, W)`` float32) and targets ``(N,)`` (labels: int64); a sample's
    id is its index."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        if self.x.ndim < 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"dataset needs x (N, ...) and y (N,), got {self.x.shape} and {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)


def digits(split: str, img_size: int = 8) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), normalised to [-1, 1].

    The split is fixed (stratified 80/20 by a constant seed) so accuracies compare across runs.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = data.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    idx = {"train": idx_train, "test": idx_test}[split]
    x = x[idx]
    if img_size != 8:
        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=img_size, mode="bilinear").numpy()
    return ArrayDataset(np.ascontiguousarray(x), y[idx])


def epoch_order(n: int, root_seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation that depends only on the root seed and epoch."""
    return torch.randperm(n, generator=generator(root_seed, STREAM_DATA, epoch)).numpy()


def batch_at(n: int, batch_size: int, root_seed: int, step: int) -> np.ndarray:
    """Sample ids of the batch of ``step`` (drop-last epochs), so resuming at a step needs no iterator state."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} samples)")
    epoch, k = divmod(step, per_epoch)
    return epoch_order(n, root_seed, epoch)[k * batch_size : (k + 1) * batch_size]
