"""Local pretrained weights: safetensors, flops_ray checkpoints or torch state dicts; no hub access.

>>> import tempfile, pathlib
>>> from torch import nn
>>> model = nn.Linear(2, 2)
>>> path = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
>>> save_state_dict(model.state_dict(), path)
>>> load_pretrained(nn.Linear(2, 2), path)
[]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flops_ray.training.checkpoint import FORMAT, MODEL, own, read_safetensors, split, write_atomically
from flops_ray.training.state import CheckpointError, check_model_state


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a plain model state dict as safetensors, atomically (for :func:`load_pretrained`)."""
    write_atomically({k: own(v) for k, v in state.items()}, {}, Path(path))


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
        tensors, metadata = read_safetensors(path)
        return split(tensors, MODEL) if FORMAT in metadata else tensors
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
    check_model_state(model, state, f"pretrained weights {path}")
    model.load_state_dict(state)
    return kept
