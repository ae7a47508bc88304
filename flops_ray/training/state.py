"""A run's resumable state as one typed value, and the checks that it fits a trainer.

The trainer produces and restores a :class:`TrainState` (torchtune's recipe-state pattern); the
checkpointer only moves it to and from files. All randomness derives from ``(seed, step)`` (noise, data
order, allocator draws), so the step counter is the whole RNG state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flops_ray.config import TrainConfig
from flops_ray.config.plain import config_to_dict

RESUME_FREE = (
    "steps",
    "eval_every",
    "farm",
    "pretrained",
    "data.cache_dir",
    "data.test_dataset",
    "estimator.pilot_cache_mb",
    "estimator.share_prefix",
)
"""Config fields a resumed run may change: run length, evaluation cadence, where queries run (the result
does not depend on it), the path the initial weights came from, where data is cached or tested, and a
memory budget earlier versions saved (``estimator.pilot_cache_mb``, gone with the pilot cache)."""


class CheckpointError(ValueError):
    """A checkpoint or weights file is unreadable, corrupt, or does not fit the model/config."""


@dataclass
class TrainState:
    """Everything a run needs to continue exactly."""

    step: int
    """Steps taken."""
    config: dict[str, Any]
    """The run's config as plain data."""
    model: dict[str, torch.Tensor]
    """The full model state (frozen weights included)."""
    optimizer: dict[str, Any]
    """The optimizer's ``state_dict()``."""
    allocators: list[dict[str, torch.Tensor]]
    """Per group, the allocator's ``state_dict()``."""
    memory: dict[str, torch.Tensor]
    """The per-sample trace memory's ``state_dict()``."""


def _flat(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_mismatch(saved: dict[str, Any], current: TrainConfig, free: Iterable[str] = RESUME_FREE) -> list[str]:
    """Fields (outside ``free``) where ``current`` differs from a saved config, as ``field: saved -> current``.

    A field the saved config lacks (it predates the field) matches the field's default: that is how the saved
    run behaved."""
    now = dict(_flat(config_to_dict(current)))
    old = {**dict(_flat(config_to_dict(TrainConfig()))), **dict(_flat(saved))}
    free = tuple(free)
    return [
        f"{key}: {old.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(old) | set(now))
        if not any(key == f or key.startswith(f + ".") for f in free) and old.get(key) != now.get(key)
    ]


def short(items: list[str], n: int = 6) -> str:
    """The first ``n`` items, comma-separated, with a count of the rest."""
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys of ``state``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {short(shapes)}")
    if problems:
        raise CheckpointError(f"{where} does not fit the model ({type(model).__name__}): " + "; ".join(problems))


def check_resumable(state: TrainState, cfg: TrainConfig, model: nn.Module, trainable: list[nn.Parameter], where: str):
    """Raise :class:`CheckpointError` unless ``state`` continues a run of ``cfg`` on ``model``.

    The config must match up to :data:`RESUME_FREE`, and the frozen weights of ``model`` must equal the
    state's (load them with ``load_model_state`` before building the trainer).
    """
    diffs = config_mismatch(state.config, cfg)
    if diffs:
        raise CheckpointError(f"{where} was saved with a different config: " + "; ".join(diffs))
    check_model_state(model, state.model, where)
    ids = {id(p) for p in trainable}
    stale = [
        name
        for name, p in model.named_parameters()
        if id(p) not in ids and not torch.equal(p.detach().cpu(), state.model[name])
    ]
    if stale:
        raise CheckpointError(
            f"{where}: frozen weights {short(stale)} differ from the model the trainer was built on; "
            "call load_model_state(model, path) before building the Trainer"
        )
