"""A whole forward-only training run: the top of a config, and the update rule the replicas apply.

Every field carries a docstring; ``validate()`` raises :class:`ConfigError` naming the field that is wrong.
It checks values only: the rules that need the registries are :func:`flops_ray.step.checks.check_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flops_ray.config.allocator import AllocatorConfig
from flops_ray.config.data import DataConfig
from flops_ray.config.estimator import EstimatorConfig
from flops_ray.config.farm import FarmConfig
from flops_ray.config.group import GroupConfig, default_groups
from flops_ray.config.lora import LoraSettings
from flops_ray.config.validation import require

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class UpdateRule:
    """How gradient estimates become parameter updates (the ``optimizer``, ``lr`` and ``grad_clip`` of a run)."""

    optimizer: str = "adam"
    """``adam`` or ``sgd`` (with ``momentum``)."""
    lr: float = 2e-3
    """Learning rate."""
    grad_clip: float = 20.0
    """Largest L2 norm of a group's gradient estimate; larger ones are scaled down (0: no clipping)."""
    momentum: float = 0.9
    """``sgd`` only."""


@dataclass(frozen=True)
class TrainConfig:
    """A whole forward-only training run. One root ``seed`` determines everything."""

    model: str = "digits_vit_pretrained"
    """Model name in the flops_ray registry (``digits_vit``, ``digits_vit_pretrained``; ``digits_mixer(_pretrained)``,
    an MLP-Mixer for the allocation evidence on a second family), any timm model name, or
    ``hf:<repo id or directory>``, a Hugging Face causal LM fine-tuned on a text dataset (README.md)."""
    pretrained: bool | str = False
    """Initial weights: ``false`` (or empty) for the seed's random init; ``true`` for timm's pretrained weights of
    ``model`` through the Hugging Face cache (``HF_HOME``; ``HF_HUB_OFFLINE=1`` never downloads); a string for
    the path of a local weights file (safetensors or torch state dict). Read once, by the driver."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset."""
    groups: tuple[GroupConfig, ...] = field(default_factory=default_groups)
    """Layer groups; each query perturbs one group."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters on a causal LM (``model: hf:...``), trained as the default groups (README.md)."""
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    """Gradient estimator."""
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    """Query allocator."""
    farm: FarmConfig = field(default_factory=FarmConfig)
    """Execution backend."""
    backprop: bool = False
    """Train the groups' parameters by backprop instead: the baseline every estimator is compared to
    (no queries; the estimator, allocator and farm settings are unused)."""
    batch_size: int = 32
    """Data points per step (``B``)."""
    steps: int = 300
    """Optimizer steps."""
    optimizer: str = "adam"
    """``adam`` or ``sgd``."""
    lr: float = 2e-3
    """Learning rate."""
    grad_clip: float = 20.0
    """Clip each group's estimated gradient to this norm; 0 disables. The default guards against outliers only
    (docs/RESULTS.md, clipping): a clip below the estimates' usual norm sets every update's size instead of the
    estimate, so the progress lines show the share of steps clipped and a run clipped almost always is warned
    about. The paper recommends clipping for attention (ViT-B's config sets 1.0)."""
    seed: int = 0
    """Root seed: noise, data order, initial weights and allocator draws all derive from it."""
    eval_every: int = 50
    """Evaluate test accuracy every this many steps (0: only at the end)."""

    def validate(self) -> TrainConfig:
        """Check every field; returns self so calls chain."""
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be > 0, got {self.lr}")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        require(
            isinstance(self.pretrained, bool | str),
            "pretrained",
            f"must be true, false or a weights file's path, got {self.pretrained!r}",
        )
        require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        require(len(self.groups) > 0, "groups", "at least one layer group is needed")
        names = [g.name for g in self.groups]
        require(len(set(names)) == len(names), "groups", f"group names must be unique, got {names}")
        self.data.validate()
        self.estimator.validate()
        self.allocator.validate()
        self.farm.validate()
        self.lora.validate()
        require(
            not self.lora.on or self.model.startswith("hf:"),
            "lora.rank",
            f"LoRA adapters are for Hugging Face causal LMs (model: hf:...), got model {self.model!r}",
        )
        for g in self.groups:
            g.validate()
        return self

    @property
    def update_rule(self) -> UpdateRule:
        """How every replica turns a gradient estimate into a step of its own copy of the parameters."""
        return UpdateRule(self.optimizer, self.lr, self.grad_clip)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)
