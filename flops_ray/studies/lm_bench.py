"""The causal LM the engine benchmark times: a GPT-2 of a named shape with random weights, read through ``hf:``.

:func:`save_gpt2` builds the shape from ``GPT2Config`` with the root seed's weights and saves it with
``save_pretrained``, for the benchmark to load as ``model: hf:<dir>`` is loaded (Conv1D as ``nn.Linear``,
:class:`~flops_ray.models.causal_lm.CausalLMScorer`, the default LM groups); :func:`token_batches` makes its
rows of random token ids, one candidate per sample. Speed depends on neither the weights nor the tokens, so
nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flops_ray.models.causal_lm import COMPLETION, PROMPT
from flops_ray.seeding import STREAM_DATA, STREAM_INIT, derive_seed
from flops_ray.studies.batches import Batch


@dataclass(frozen=True)
class LMShape:
    """A GPT-2's size and the length of the rows it scores."""

    gpt2: dict = field(default_factory=dict)
    """``GPT2Config`` arguments (empty: GPT-2 small's defaults)."""
    tokens: int = 64
    """``T``: tokens per row, the first half prompt, the rest completion."""


SHAPES = {
    "gpt2_small": LMShape(),
    "quick": LMShape({"n_embd": 384, "n_layer": 6, "n_head": 6}, tokens=32),
    "tiny": LMShape(
        {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 256, "bos_token_id": 0, "eos_token_id": 0}, 8
    ),
}
"""Shapes by name: GPT-2 small; half its width and layers, its vocabulary, half its tokens per row (``--quick``,
a few minutes on 2 cores); a tiny one for the tests."""


def save_gpt2(shape: str, seed: int, folder: Path) -> Path:
    """Save a ``GPT2LMHeadModel`` of :data:`SHAPES` ``[shape]`` with ``seed``'s random weights in ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, STREAM_INIT))
        GPT2LMHeadModel(GPT2Config(**SHAPES[shape].gpt2)).save_pretrained(folder)
    return folder


def token_batches(shape: str, model: nn.Module, seed: int) -> Callable[[int], Batch]:
    """Batches of ``samples`` rows ``x (samples, 1, 2, T)`` of random token ids in ``model``'s vocabulary (row 1
    the roles: prompt, then completion), ``y = 0`` (the one candidate) and ids ``0..samples-1``."""
    tokens, vocab = SHAPES[shape].tokens, model.lm.config.vocab_size

    def batch(samples: int) -> Batch:
        gen = torch.Generator().manual_seed(derive_seed(seed, STREAM_DATA))
        x = torch.full((samples, 1, 2, tokens), COMPLETION)
        x[:, :, 0] = torch.randint(vocab, (samples, 1, tokens), generator=gen)
        x[:, :, 1, : tokens // 2] = PROMPT
        return x.numpy(), np.zeros(samples, dtype=np.int64), np.arange(samples)

    return batch
