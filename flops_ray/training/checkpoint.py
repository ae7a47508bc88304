"""Checkpoint files: a :class:`~flops_ray.training.state.TrainState` as one safetensors file; loading never unpickles code.

The file holds the tensors (full model state, optimizer state, allocator states) plus a JSON header entry
(format version, step counter, config, optimizer hyper-parameters and a SHA-256 of the tensor bytes).
One file written to a temporary name and renamed means a crash mid-write never destroys the last good
checkpoint. This module only moves state to and from files; the trainer decides what the state is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from flops_ray.config import TrainConfig
from flops_ray.config.plain import config_from_dict
from flops_ray.files import atomic_path
from flops_ray.training.state import CheckpointError, TrainState, check_model_state

FORMAT = "flops_ray.training.checkpoint"
VERSION = 2
"""Version 2: the ``data`` section and ``backprop`` flag in the config, the trace memory."""

MODEL, _OPTIM, _ALLOC, _MEMORY = "model/", "optim/", "alloc/", "memory/"


# ---- writing --------------------------------------------------------------------------------------------
def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file that replaces ``path`` only once complete (:func:`flops_ray.files.atomic_path`)."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def own(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own storage (safetensors refuses tensors that share storage: tied weights, views)."""
    return t.detach().cpu().clone().contiguous()


def save_checkpoint(state: TrainState, path: str | Path) -> Path:
    """Write ``state`` to ``path`` (conventionally ``*.safetensors``), replacing it atomically; returns the path."""
    tensors = {MODEL + k: own(v) for k, v in state.model.items()}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state.optimizer["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM}{idx}/{name}"] = own(value)
            else:
                # Non-tensor optimizer state (e.g. SGD's momentum_buffer None on the first step) is JSON.
                opt_scalars.setdefault(str(idx), {})[name] = value
    for g, alloc in enumerate(state.allocators):
        tensors.update({f"{_ALLOC}{g}/{k}": own(v) for k, v in alloc.items()})
    tensors.update({_MEMORY + k: own(v) for k, v in state.memory.items()})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "step": state.step,
        "config": state.config,
        "optimizer": {
            "param_groups": state.optimizer["param_groups"],
            "state_keys": sorted(str(i) for i in state.optimizer["state"]),
            "scalars": opt_scalars,
        },
        "allocators": len(state.allocators),
        "sha256": _digest(tensors),
    }
    path = Path(path)
    write_atomically(tensors, {FORMAT: json.dumps(header)}, path)
    return path


# ---- reading --------------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated (not a readable safetensors file): {exc}") from exc


def split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_checkpoint(path: str | Path) -> TrainState:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: corrupt or truncated file, checksum mismatch, or not a flops_ray checkpoint.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if FORMAT not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a flops_ray checkpoint (no {FORMAT!r} header)")
    try:
        header = json.loads(metadata[FORMAT])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: checkpoint header is not valid JSON ({exc})") from exc
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {header.get('version')}, this code reads {VERSION}")
    if _digest(tensors) != header.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: the tensor data does not match the checksum in its header")
    opt = header["optimizer"]
    opt_state: dict[int, dict[str, Any]] = {int(i): dict(opt["scalars"].get(i, {})) for i in opt["state_keys"]}
    for key, value in split(tensors, _OPTIM).items():
        idx, name = key.split("/", 1)
        opt_state[int(idx)][name] = value
    # JSON turned tuples (Adam's betas) into lists; restore them so the optimizer sees what it saved.
    groups = [
        {k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in g.items()}
        for g in opt["param_groups"]
    ]
    allocs = split(tensors, _ALLOC)
    return TrainState(
        step=int(header["step"]),
        config=header["config"],
        model=split(tensors, MODEL),
        optimizer={"state": opt_state, "param_groups": groups},
        allocators=[split(allocs, f"{g}/") for g in range(header["allocators"])],
        memory=split(tensors, _MEMORY),
    )


def checkpoint_config(path: str | Path) -> TrainConfig:
    """The config a checkpoint was saved with."""
    return config_from_dict(read_checkpoint(path).config)


def load_model_state(model: nn.Module, path: str | Path) -> int:
    """Load a checkpoint's full model state into ``model`` (before a Trainer is built on it).

    Replicas copy the model when the trainer starts, so frozen weights must be in place first.

    Returns:
        The checkpoint's step counter.
    """
    state = read_checkpoint(path)
    check_model_state(model, state.model, f"checkpoint {path}")
    model.load_state_dict(state.model)
    return state.step
