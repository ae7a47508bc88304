"""Black-box prompt tuning of a CLIP (paper section 5.2, appendix C.2, Table 2): the run's settings, its tasks,
the black box, one tuning run and the manual-prompt baseline.

A method is an estimator and an allocator at the same query budget (:data:`METHODS`): OPS-LR and OPS-SPSA fit the
Gaussian allocator (paper eqs. 5, 9-11), LR and SPSA allocate equally. LR perturbs the prompts ``p`` (the output of
the linear ``z -> p0 + z W``) and maps its estimate back to ``z``; SPSA perturbs ``z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, TrainConfig, require
from flops_ray.config.plain import dataclass_from_dict
from flops_ray.data.arrays import ArrayDataset
from flops_ray.data.parquet import read_parquet
from flops_ray.models.blackbox import BlackBox
from flops_ray.models.clip_prompts import CLIPPromptLoss, encode_texts
from flops_ray.seeding import STREAM_INIT, derive_seed

METHODS = {
    "ops_lr": ("lr", "gaussian"),
    "ops_spsa": ("spsa", "gaussian"),
    "lr": ("lr", "equal"),
    "spsa": ("spsa", "equal"),
}
"""Table 2's tuned rows: method -> (estimator kind, allocator kind)."""
_PROJECTION = 0x5650
"""Counter of the projection's draw."""


@dataclass(frozen=True)
class TaskSpec:
    """One classification dataset: a stand-in task by name, or Parquet files of images and labels."""

    name: str
    """The dataset's name in the results (a stand-in task of :data:`~flops_ray.data.standin_clip.TASKS`: ``digits``,
    ``places``, ``low_res_places``, ...)."""
    train: str = ""
    """Parquet file of the training images (empty: the stand-in task ``name``)."""
    test: str = ""
    """Parquet file of the test images (with ``train``)."""
    classes: tuple[str, ...] = ()
    """Class names in label order (with ``train``; the stand-in's are known)."""


@dataclass(frozen=True)
class VLMPromptConfig:
    """The prompt-tuning study: model, prompts, projection, budget, optimizer, methods and datasets."""

    model: str = "hf:standin"
    """``hf:standin`` (the stand-in CLIP the job pretrains into ``OUT/standin``), or ``hf:<hub id or directory>``."""
    standin_seed: int = 0
    """Seed of the stand-in CLIP and its tasks (fixed across tuning seeds, as one released CLIP would be)."""
    standin_steps: int = 500
    """Contrastive pretraining steps of the stand-in."""
    datasets: tuple[TaskSpec, ...] = (TaskSpec("digits"), TaskSpec("places"), TaskSpec("low_res_places"))
    """The classification datasets (columns of Table 2)."""
    shots: int = 16
    """Training images per class (C.2: the same 16-shot split for every method)."""
    test_size: int = 500
    """Test images per stand-in task (Parquet: the whole test file)."""
    text_tokens: int = 12
    """Text prefix prompt tokens after the text's BOS (C.2: 12)."""
    image_tokens: int = 10
    """Image suffix prompt tokens after the patches (C.2: 10)."""
    text_dim: int = 500
    """``d_T``: intrinsic dimension of the text prompt (C.2: ``d_T + d_I = 1000``)."""
    image_dim: int = 500
    """``d_I``: intrinsic dimension of the image prompt."""
    template: str = "{}."
    """Class text the text prompt precedes (``[BOS] p_T template [EOS]``)."""
    manual: str = "a photo of a {}."
    """The manual prompt (Table 2's baseline row), no tuned prompt."""
    prompt_init: str = "zeros"
    """``p0``: ``zeros``, or ``embeddings``: the text prompt starts as the manual prompt's opening words
    (``"a photo of a"``, repeated to fill the tokens) and every image prompt token as the mean patch token of the
    training images, both read from the model once, before the search (a small CLIP answers near chance with
    zero prompts in its sequences)."""
    methods: tuple[str, ...] = ("ops_lr", "ops_spsa", "lr", "spsa")
    """Tuned rows, from :data:`METHODS`."""
    sigma: float = 0.05
    """Perturbation scale: of ``p`` (LR) or of ``z`` (SPSA); with ``W ~ N(0, 1/d)`` both move ``p`` by about
    ``sigma`` per coordinate."""
    queries_per_sample: int = 60
    """Mean queries per data point (C.2: 60); the allocators split ``batch_size`` times this."""
    batch_size: int = 64
    """Data points per step (C.2: 64)."""
    epochs: int = 50
    """Passes over the few-shot training set (C.2: 50 epochs)."""
    optimizer: str = "adam"
    """Optimizer of ``z`` (C.2: Adam)."""
    lr: float = 1e-4
    """Learning rate of ``z`` (C.2: 1e-4)."""
    grad_clip: float = 0.0
    """Clip the estimate's norm to this (0: off)."""
    eval_batch: int = 256
    """Test images per evaluation call."""
    backend: str = "ray"
    """``ray`` (the query farm) or ``local`` (in-process)."""
    replicas: int = 2
    """Replica actors of the farm."""
    num_gpus_per_replica: float = 0.0
    """GPUs per replica actor (a real CLIP on a GPU cluster)."""

    def __post_init__(self):
        for name in ("shots", "test_size", "text_tokens", "image_tokens", "text_dim", "image_dim", "batch_size"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.epochs >= 1 and self.queries_per_sample >= 2, "epochs", "needs epochs >= 1 and 2+ queries")
        require(self.sigma > 0 and self.lr > 0, "sigma", f"sigma and lr must be > 0, got {self.sigma}, {self.lr}")
        unknown = sorted(set(self.methods) - set(METHODS))
        require(not unknown, "methods", f"unknown {unknown}; known are {sorted(METHODS)}")
        require(self.backend in ("ray", "local"), "backend", f"must be ray or local, got {self.backend!r}")
        require(
            self.prompt_init in ("zeros", "embeddings"),
            "prompt_init",
            f"must be zeros or embeddings, got {self.prompt_init!r}",
        )
        require(len({d.name for d in self.datasets}) == len(self.datasets), "datasets", "names must differ")


def load_vlm_config(path: str | Path) -> VLMPromptConfig:
    """Read a YAML config (the fields of :class:`VLMPromptConfig`), naming a wrong or unknown field."""
    import yaml

    return dataclass_from_dict(VLMPromptConfig, yaml.safe_load(Path(path).read_text()) or {})


@dataclass(frozen=True)
class Task:
    """A dataset ready for tuning: preprocessed images ``(N, 3, S, S)`` float32 and labels."""

    name: str
    classes: tuple[str, ...]
    train: ArrayDataset
    test: ArrayDataset


def parquet_task(spec: TaskSpec, shots: int, processor, seed: int) -> Task:
    """A Parquet task: ``shots`` per class drawn from ``spec.train`` (from ``seed``), all of ``spec.test``."""
    from flops_ray.data.standin_clip import preprocess

    require(bool(spec.test and spec.classes), f"datasets.{spec.name}", "a Parquet task needs test and classes")
    side = processor.crop_size["height"]
    train, test = read_parquet(spec.train, side, 3), read_parquet(spec.test, side, 3)
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(train.y == c))[:shots] for c in range(len(spec.classes))])
    to_uint8 = lambda x: np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)  # noqa: E731 (images in [-1, 1])
    return Task(
        spec.name,
        spec.classes,
        ArrayDataset(preprocess(processor, to_uint8(train.x[pick])).numpy(), train.y[pick]),
        ArrayDataset(preprocess(processor, to_uint8(test.x)).numpy(), test.y),
    )


def prompt_projection(cfg: VLMPromptConfig, text_size: int, image_size: int, seed: int) -> torch.Tensor:
    """``W (d_T + d_I, D)`` block-diagonal: ``z``'s first ``d_T`` numbers make the text prompt, the rest the image
    prompt, each block ``N(0, 1/d)`` (so a unit step of ``z`` moves ``p`` by about one per coordinate)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, STREAM_INIT, _PROJECTION))
    w = torch.zeros(cfg.text_dim + cfg.image_dim, text_size + image_size)
    w[: cfg.text_dim, :text_size] = torch.randn(cfg.text_dim, text_size, generator=gen) / math.sqrt(cfg.text_dim)
    w[cfg.text_dim :, text_size:] = torch.randn(cfg.image_dim, image_size, generator=gen) / math.sqrt(cfg.image_dim)
    return w


def prompt_loss(cfg: VLMPromptConfig, clip, tokenizer, classes: tuple[str, ...]) -> CLIPPromptLoss:
    """The black box's loss function for ``classes``: the frozen CLIP behind text and image prompts."""
    ids, eos = encode_texts(tokenizer, [cfg.template.format(c) for c in classes])
    return CLIPPromptLoss(clip, ids, eos, cfg.text_tokens, cfg.image_tokens)


@torch.no_grad()
def initial_prompts(cfg: VLMPromptConfig, loss: CLIPPromptLoss, tokenizer, train: ArrayDataset) -> torch.Tensor:
    """``p0 (D,)`` as ``cfg.prompt_init`` says."""
    if cfg.prompt_init == "zeros":
        return torch.zeros(loss.prompt_size)
    opening = tokenizer(cfg.manual.split("{}")[0], add_special_tokens=False)["input_ids"]
    ids = torch.tensor((opening * loss.text_tokens)[: loss.text_tokens])
    text = loss.clip.text_model.embeddings.token_embedding(ids)  # (T_T, E_T)
    patches = loss.clip.vision_model.embeddings(torch.from_numpy(train.x))[:, 1:].mean((0, 1))  # (E_I,)
    return torch.cat([text.flatten(), patches.repeat(loss.image_tokens)]).float()


def prompt_box(cfg: VLMPromptConfig, loss: CLIPPromptLoss, p0: torch.Tensor, seed: int) -> BlackBox:
    """The black box ``p = p0 + z W`` with the block projection of :func:`prompt_projection`."""
    text_size = loss.text_tokens * loss.text_width
    w = prompt_projection(cfg, text_size, loss.prompt_size - text_size, seed)
    return BlackBox(loss, p0, projection=w, inference=True)


@torch.inference_mode()
def accuracy(loss: CLIPPromptLoss, theta: torch.Tensor, test: ArrayDataset, batch: int) -> float:
    """Test accuracy of the prompts ``theta (D,)``."""
    hits = 0
    for s in range(0, len(test), batch):
        x = torch.from_numpy(test.x[s : s + batch])
        hits += int((loss.logits(theta[None].expand(len(x), -1), x).argmax(1).numpy() == test.y[s : s + batch]).sum())
    return hits / len(test)


@torch.inference_mode()
def manual_accuracy(cfg: VLMPromptConfig, loss: CLIPPromptLoss, tokenizer, task: Task) -> float:
    """Test accuracy of plain CLIP with the manual prompt (Table 2's baseline)."""
    ids, eos = encode_texts(tokenizer, [cfg.manual.format(c) for c in task.classes])
    hits = 0
    for s in range(0, len(task.test), cfg.eval_batch):
        x = torch.from_numpy(task.test.x[s : s + cfg.eval_batch])
        hits += int((loss.manual_logits(ids, eos, x).argmax(1).numpy() == task.test.y[s : s + cfg.eval_batch]).sum())
    return hits / len(task.test)


def train_config(cfg: VLMPromptConfig, method: str, train_size: int, seed: int) -> TrainConfig:
    """The trainer's settings for ``method`` on ``train_size`` images: one group (the searched ``z``), its estimator
    and allocator, ``cfg.epochs`` passes in batches of ``batch_size`` (at most the whole training set)."""
    kind, allocator = METHODS[method]
    batch = min(cfg.batch_size, train_size)
    return TrainConfig(
        groups=(BlackBox.group(cfg.sigma, cfg.queries_per_sample, name="prompt"),),
        estimator=EstimatorConfig(kind=kind),
        allocator=AllocatorConfig(kind=allocator),
        batch_size=batch,
        steps=cfg.epochs * math.ceil(train_size / batch),
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        grad_clip=cfg.grad_clip,
        seed=seed,
        farm=farm_config(cfg),
    )


def farm_config(cfg: VLMPromptConfig) -> FarmConfig:
    """The farm every tuning run of ``cfg`` uses."""
    return FarmConfig(backend=cfg.backend, replicas=cfg.replicas, num_gpus_per_replica=cfg.num_gpus_per_replica)
