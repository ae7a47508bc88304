"""Checkpoints that resume a run exactly, and local pretrained weights; loading never unpickles code.

A checkpoint is one safetensors file: the tensors (full model state, optimizer state, allocator states)
plus a JSON header entry (format version, step counter, config, optimizer hyper-parameters and a
SHA-256 of the tensor bytes). All randomness derives from ``(seed, step)`` (noise, data order,
allocator draws), so the step counter is the whole RNG state. One file written to a temporary name
and renamed means a crash mid-write never destroys the last good checkpoint.

>>> import tempfile, pathlib
>>> from torch import nn
>>> model = nn.Linear(2, 2)
>>> path = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
>>> save_state_dict(model.state_dict(), path)
>>> load_pretrained(nn.Linear(2, 2), path)
[]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from flops_ray.config import TrainConfig, config_from_dict, config_to_dict

if TYPE_CHECKING:
    from flops_ray.trainer import Trainer

FORMAT = "flops_ray.checkpoint"
VERSION = 1
RESUME_FREE = ("steps", "eval_every", "farm", "pretrained")
"""Config fields a resumed run may change: run length, logging, where queries run (the result does
not depend on it) and the path the initial weights came from."""

_MODEL, _OPTIM, _ALLOC = "model/", "optim/", "alloc/"


class CheckpointError(ValueError):
    """A checkpoint or weights file is unreadable, corrupt, or does not fit the model/config."""


# ---- writing --------------------------------------------------------------------------------------------
def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        # fsync before the rename: otherwise a power loss can leave the new name pointing at no data.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _own(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage (tied weights, views), so every entry gets its own copy.
    return t.detach().cpu().clone().contiguous()


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a plain model state dict as safetensors, atomically (for ``load_pretrained``)."""
    _write_atomically({k: _own(v) for k, v in state.items()}, {}, Path(path))


def save_checkpoint(trainer: Trainer, path: str | Path) -> Path:
    """Save everything a :class:`~flops_ray.trainer.Trainer` needs to continue exactly.

    Args:
        trainer: the trainer (model, optimizer, allocators, step counter, config).
        path: the checkpoint file (conventionally ``*.safetensors``); replaced atomically.

    Returns:
        The path written.
    """
    tensors = {_MODEL + k: _own(v) for k, v in trainer.model.state_dict().items()}
    opt = trainer.optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM}{idx}/{name}"] = _own(value)
            else:
                # Non-tensor optimizer state (e.g. SGD's momentum_buffer None on the first step) is JSON.
                opt_scalars.setdefault(str(idx), {})[name] = value
    for g, alloc in enumerate(trainer.allocators):
        tensors.update({f"{_ALLOC}{g}/{k}": _own(v) for k, v in alloc.state_dict().items()})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "step": trainer.step_count,
        "config": config_to_dict(trainer.cfg),
        "optimizer": {
            "class": type(trainer.optimizer).__name__,
            "param_groups": opt["param_groups"],
            "state_keys": sorted(str(i) for i in opt["state"]),
            "scalars": opt_scalars,
        },
        "allocators": len(trainer.allocators),
        "sha256": _digest(tensors),
    }
    path = Path(path)
    _write_atomically(tensors, {FORMAT: json.dumps(header)}, path)
    return path


# ---- reading --------------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated (not a readable safetensors file): {exc}") from exc


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Returns:
        The tensors and the header (``step``, ``config``, ``optimizer``, ...).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: corrupt or truncated file, checksum mismatch, or not a flops_ray checkpoint.
    """
    path = Path(path)
    tensors, metadata = _read(path)
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
    return tensors, header


def checkpoint_config(path: str | Path) -> TrainConfig:
    """The config a checkpoint was saved with."""
    _, header = read_checkpoint(path)
    return config_from_dict(header["config"])


def config_mismatch(saved: dict[str, Any], current: TrainConfig, free: Iterable[str] = RESUME_FREE) -> list[str]:
    """Fields (outside ``free``) where ``current`` differs from a saved config, as ``field: saved -> current``."""
    now = config_to_dict(current)
    return [
        f"{key}: {saved.get(key)!r} -> {now[key]!r}"
        for key in sorted(now)
        if key not in free and saved.get(key) != now[key]
    ]


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
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
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_short(shapes)}")
    if problems:
        raise CheckpointError(f"{where} does not fit the model ({type(model).__name__}): " + "; ".join(problems))


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_model_state(model: nn.Module, path: str | Path) -> int:
    """Load a checkpoint's full model state into ``model`` (before a Trainer is built on it).

    Replicas copy the model when the trainer starts, so frozen weights must be in place first.

    Returns:
        The checkpoint's step counter.
    """
    tensors, header = read_checkpoint(path)
    state = _split(tensors, _MODEL)
    _check_model_state(model, state, f"checkpoint {path}")
    model.load_state_dict(state)
    return int(header["step"])


def load_checkpoint(trainer: Trainer, path: str | Path) -> int:
    """Restore a trainer from a checkpoint so that it continues exactly as the saved run would have.

    The trainer must have been built with the same config (up to :data:`RESUME_FREE`) on a model
    whose frozen weights equal the checkpoint's (use :func:`load_model_state` before building it).

    Returns:
        The step counter the trainer continues from.

    Raises:
        CheckpointError: unreadable or corrupt file, different config, model, optimizer or allocators.
    """
    tensors, header = read_checkpoint(path)
    diffs = config_mismatch(header["config"], trainer.cfg)
    if diffs:
        raise CheckpointError(f"checkpoint {path} was saved with a different config: " + "; ".join(diffs))
    state = _split(tensors, _MODEL)
    _check_model_state(trainer.model, state, f"checkpoint {path}")
    trainable = {id(p) for p in trainer.params}
    stale = [
        name
        for name, p in trainer.model.named_parameters()
        if id(p) not in trainable and not torch.equal(p.detach().cpu(), state[name])
    ]
    if stale:
        raise CheckpointError(
            f"checkpoint {path}: frozen weights {_short(stale)} differ from the model the trainer was built on; "
            "call load_model_state(model, path) before building the Trainer"
        )
    opt_header = header["optimizer"]
    if opt_header["class"] != type(trainer.optimizer).__name__:
        raise CheckpointError(
            f"checkpoint {path} holds {opt_header['class']} state, the trainer uses {type(trainer.optimizer).__name__}"
        )
    if header["allocators"] != len(trainer.allocators):
        raise CheckpointError(
            f"checkpoint {path} holds {header['allocators']} allocator states, the trainer has {len(trainer.allocators)}"
        )
    opt_state: dict[int, dict[str, Any]] = {
        int(i): dict(opt_header["scalars"].get(i, {})) for i in opt_header["state_keys"]
    }
    for key, value in _split(tensors, _OPTIM).items():
        idx, name = key.split("/", 1)
        opt_state[int(idx)][name] = value
    # JSON turned tuples (Adam's betas) into lists; restore them so the optimizer sees what it saved.
    groups = [
        {k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in g.items()}
        for g in opt_header["param_groups"]
    ]
    try:
        trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: optimizer state does not fit the trainer's optimizer ({exc})"
        ) from exc
    alloc_states = _split(tensors, _ALLOC)
    for g, alloc in enumerate(trainer.allocators):
        try:
            alloc.load_state_dict(_split(alloc_states, f"{g}/"))
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path}: allocator state of group {g} does not fit ({exc})") from exc
    with torch.no_grad():
        trainer.model.load_state_dict(state)
    trainer.step_count = int(header["step"])
    return trainer.step_count


# ---- pretrained weights ---------------------------------------------------------------------------------
def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A model state dict from a local file: safetensors, a flops_ray checkpoint, or a torch state dict.

    Torch files are read with ``weights_only=True`` (no pickled code runs); a dict nesting the weights
    under ``state_dict`` or ``model`` (common training-script layouts) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist")
    if path.suffix == ".safetensors":
        tensors, metadata = _read(path)
        return _split(tensors, _MODEL) if FORMAT in metadata else tensors
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise CheckpointError(f"{path} is not a loadable torch state dict (weights_only=True): {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    return obj


def load_pretrained(model: nn.Module, path: str | Path, fresh_head: bool = True) -> list[str]:
    """Load local pretrained weights into a (timm) model; no hub access.

    Args:
        model: the model to fill.
        path: safetensors file, flops_ray checkpoint, or torch state dict.
        fresh_head: keep the model's freshly initialised classifier when the file's has another
            shape (fine-tuning on a dataset with a different number of classes).

    Returns:
        Keys kept from the model's own initialisation (the classifier when ``fresh_head`` applied).

    Raises:
        CheckpointError: missing or unexpected keys, or shapes that differ outside the classifier.
    """
    state = read_weights(path)
    own = model.state_dict()
    kept: list[str] = []
    if fresh_head:
        heads = _classifier_prefixes(model)
        for k in own:
            if k.startswith(heads) and (k not in state or state[k].shape != own[k].shape):
                kept.append(k)
                state[k] = own[k]
    _check_model_state(model, state, f"pretrained weights {path}")
    model.load_state_dict(state)
    return kept
