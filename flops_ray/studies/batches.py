"""The batches the benchmarks time on: a step's batch of the built-in digits, or random pixels of a config's size."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flops_ray.app.run import model_in_chans
from flops_ray.config import TrainConfig
from flops_ray.data.arrays import batch_at, digits

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``x``, ``y`` and the sample ids of a batch."""


def digits_batch(size: int, seed: int, img_size: int = 8) -> Batch:
    """``x``, ``y`` and the sample ids of the first step's batch of ``size`` digits training images (seed ``seed``)."""
    train = digits("train", img_size)
    ids = batch_at(len(train), size, seed, 0)
    return train.x[ids], train.y[ids], ids


def config_batch(cfg: TrainConfig, model: nn.Module, samples: int) -> Batch:
    """``samples`` rows ``x``, ``y`` and their ids for ``cfg``: the built-in digits, else random pixels of the
    config's size (other datasets are not in the repository; a forward costs the same whatever the pixels)."""
    if cfg.data.dataset == "digits":
        return digits_batch(samples, cfg.seed, cfg.data.img_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    size = cfg.data.img_size
    x = torch.randn(samples, model_in_chans(model), size, size, generator=gen)
    y = torch.randint(cfg.data.num_classes, (samples,), generator=gen)
    return x.numpy(), y.numpy(), np.arange(samples)
