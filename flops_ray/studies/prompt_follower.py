"""The frozen prompt-following ViT of the black-box prompt-tuning study: its settings, pretraining and premise.

The frozen model is a digits ViT pretrained by backprop to *follow a prompt*: two learned prompts select
between two labellings of the same images (the digit, or the digit shifted by ``SHIFT`` mod 10). The first
prompt ships with the model as its default; the second is thrown away, and a black-box search must find a
prompt that brings its labelling back from losses alone. The premise, that the model does follow its
prompts, is checked on held-out data before any search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flops_ray.config import require
from flops_ray.data.arrays import ArrayDataset, digits
from flops_ray.models.blackbox import BlackBox
from flops_ray.models.factory import digits_vit
from flops_ray.models.prompts import PromptedViT
from flops_ray.seeding import STREAM_INIT, derive_seed


@dataclass(frozen=True)
class PromptConfig:
    """The prompt-tuning run: the frozen model's pretraining, its premise check, and the black-box search."""

    prompt_tokens: int = 2
    """Prompt tokens inserted after the class token (``T``)."""
    prompt_init: float = 1.0
    """Standard deviation of the two prompts' initial values: prompts as large as the tokens differ from the
    start, so the model learns to read them."""
    prompt_mix: float = 0.5
    """Fraction of pretraining images shown a prompt ``(1 - a) p_0 + a p_1`` (``a ~ U(0, 1)``) with the target
    ``(1 - a) digit + a (digit + 5)``; the rest see ``p_0`` or ``p_1`` with its labelling. The mixtures give the
    hidden task's loss a slope from the default prompt on, which a search seeing only losses can follow."""
    pretrain_lr: float = 2e-3
    """AdamW learning rate of the backprop pretraining (model and both prompts)."""
    pretrain_batch: int = 64
    """Images per pretraining step."""
    follow_threshold: float = 0.85
    """The premise: the pretraining stops once the model, under each prompt, gets at least this accuracy on
    that prompt's labelling of held-out data. It leaves room below the level at which a digits ViT trained
    from scratch levels off on that data, so the check waits for learning, not for a lucky evaluation."""
    pretrain_check_every: int = 100
    """Pretraining steps between premise checks."""
    pretrain_max_steps: int = 6000
    """Bound on the pretraining: the job fails naming the figures if the premise is not met by then."""
    subspace: int = 32
    """Dimension ``d`` of the searched vector ``z``."""
    steps: int = 200
    """Black-box optimizer steps per allocator."""
    batch_size: int = 32
    """Data points per step (``B``)."""
    queries_per_sample: int = 8
    """Mean queries per data point (the allocators split ``B`` times this)."""
    sigma: float = 0.2
    """ES perturbation scale in ``z``."""
    lr: float = 0.1
    """Adam learning rate on ``z``."""
    allocators: tuple[str, ...] = ("gaussian", "equal")
    """The first is the headline ``accuracy`` (OPS); the others are compared with it."""
    backend: str = "ray"
    """``ray`` (the query farm on a local or joined Ray) or ``local`` (in-process)."""
    replicas: int = 2
    """Replica actors of the farm (``backend = ray``)."""
    eval_every: int = 10
    """Test accuracy every this many steps (and after the last)."""
    seed: int = 0
    """Root seed of the pretraining, the projection, the batches and every query's noise."""

    def __post_init__(self):
        for name in (
            "steps",
            "eval_every",
            "batch_size",
            "queries_per_sample",
            "replicas",
            "prompt_tokens",
            "pretrain_batch",
            "pretrain_check_every",
            "pretrain_max_steps",
        ):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(
            0.0 <= self.follow_threshold <= 1.0, "follow_threshold", f"must be in [0, 1], got {self.follow_threshold}"
        )
        require(self.prompt_init > 0, "prompt_init", f"must be > 0, got {self.prompt_init}")
        require(0.0 <= self.prompt_mix <= 1.0, "prompt_mix", f"must be in [0, 1], got {self.prompt_mix}")


SHIFT = 5
"""The hidden task's labelling: ``(digit + SHIFT) mod 10``."""


class PremiseError(RuntimeError):
    """The pretraining did not teach the frozen model to follow its prompts within its bound."""


def labelled(data: ArrayDataset, k: int) -> ArrayDataset:
    """The same images under labelling ``k``: ``(digit + k * SHIFT) mod 10``."""
    return ArrayDataset(data.x, (data.y + k * SHIFT) % 10)


def shifted(data: ArrayDataset) -> ArrayDataset:
    """The hidden task: the same images, labelled ``(digit + SHIFT) mod 10``."""
    return labelled(data, 1)


def held_out(data: ArrayDataset) -> tuple[ArrayDataset, ArrayDataset]:
    """Split ``data`` into the pretraining's part and a fixed held-out fifth that judges the premise.

    The split does not depend on the seed, so premise figures compare across seeds; the test split stays
    untouched by any stopping decision.
    """
    order = np.random.default_rng(0).permutation(len(data))
    keep, judge = order[len(data) // 5 :], order[: len(data) // 5]
    return ArrayDataset(data.x[keep], data.y[keep]), ArrayDataset(data.x[judge], data.y[judge])


def follow_matrix(model: PromptedViT, prompts: torch.Tensor, data: ArrayDataset) -> list[list[float]]:
    """Accuracy under prompt ``i`` (row) on labelling ``j`` (column) of ``data``."""
    return [[model.accuracy(p, labelled(data, j)) for j in range(2)] for p in prompts]


def pretrain_prompt_follower(cfg: PromptConfig) -> tuple[PromptedViT, torch.Tensor, dict]:
    """Backprop-train a digits ViT and two prompts, one per labelling, until the model follows both.

    Every batch shows both prompts with their labellings (and mixtures, ``prompt_mix``): a model ignoring the
    prompt is stuck at half, so it must learn to read it.

    Every ``pretrain_check_every`` steps the model is judged on held-out data; training stops at the first
    check where each prompt gets at least ``follow_threshold`` on its own labelling.

    Returns:
        The frozen model, its two prompts ``(2, T*E)`` (row 0 is the default) and the premise's record:
        ``threshold``, ``pretrain_steps``, ``held_out`` (:func:`follow_matrix` at the last check) and ``checks``.

    Raises:
        PremiseError: the premise is not met after ``pretrain_max_steps`` steps.
    """
    torch.manual_seed(derive_seed(cfg.seed, STREAM_INIT))
    model = PromptedViT(digits_vit(num_classes=10), cfg.prompt_tokens)
    model.vit.requires_grad_(True).train()
    prompts = nn.Parameter(cfg.prompt_init * torch.randn(2, cfg.prompt_tokens * model.vit.embed_dim))
    fit, judge = held_out(digits("train"))
    opt = torch.optim.AdamW([*model.vit.parameters(), prompts], lr=cfg.pretrain_lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, STREAM_INIT, 3))
    checks = []
    for step in range(1, cfg.pretrain_max_steps + 1):
        loss = _pretrain_step(cfg, model, prompts, fit, opt, gen)
        if step % cfg.pretrain_check_every and step < cfg.pretrain_max_steps:
            continue
        model.vit.eval()
        matrix = follow_matrix(model, prompts.detach(), judge)
        model.vit.train()
        follow = [matrix[0][0], matrix[1][1]]
        checks.append({"step": step, "loss": loss, "follow": follow})
        print(f"pretrain step {step:>5}  loss {loss:.3f}  follows prompts {follow[0]:.3f} {follow[1]:.3f}", flush=True)
        if min(follow) >= cfg.follow_threshold:
            break
    else:
        raise PremiseError(
            f"after {cfg.pretrain_max_steps} pretraining steps the frozen model follows its prompts with held-out "
            f"accuracy {follow[0]:.3f} (default prompt, digit) and {follow[1]:.3f} (second prompt, digit + {SHIFT}), "
            f"below the premise threshold {cfg.follow_threshold}: raise pretrain_max_steps or check the recipe"
        )
    model.vit.requires_grad_(False).eval()
    premise = {"threshold": cfg.follow_threshold, "pretrain_steps": step, "held_out": matrix, "checks": checks}
    return model, prompts.detach().clone(), premise


def _pretrain_step(
    cfg: PromptConfig,
    model: PromptedViT,
    prompts: nn.Parameter,
    data: ArrayDataset,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> float:
    """One AdamW step on a batch of ``data``, each image under prompt 0, prompt 1 or a mixture with the matching
    mixture of labellings; returns the batch's loss."""
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    idx = torch.randint(len(y), (cfg.pretrain_batch,), generator=gen)
    task = torch.randint(2, (cfg.pretrain_batch,), generator=gen).float()
    mixed = torch.rand(cfg.pretrain_batch, generator=gen) < cfg.prompt_mix
    a = torch.where(mixed, torch.rand(cfg.pretrain_batch, generator=gen), task)
    logp = model.logits(torch.lerp(prompts[0], prompts[1], a[:, None]), x[idx]).log_softmax(-1)
    digit, hidden = logp.gather(1, y[idx, None])[:, 0], logp.gather(1, (y[idx, None] + SHIFT) % 10)[:, 0]
    loss = -torch.lerp(digit, hidden, a).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def prompt_box(cfg: PromptConfig, model: PromptedViT, default: torch.Tensor) -> BlackBox:
    """The black box a search tunes: ``model``'s per-sample losses under the prompt ``default + z W``, ``z`` in a
    ``cfg.subspace``-dimensional subspace drawn from ``cfg.seed``."""
    return BlackBox(model, default, subspace=cfg.subspace, seed=derive_seed(cfg.seed, STREAM_INIT, 4))
