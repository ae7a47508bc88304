"""Hugging Face causal LMs as model sources: ``hf:<repo id or directory>`` loaded with transformers' ``from_pretrained``.

A directory is read as it is; a repository id goes through huggingface_hub's cache, so ``HF_HOME`` and
``HF_HUB_OFFLINE=1`` apply and nothing else downloads. Loading happens once, on the driver: replicas get the
model through the object store. GPT-2's ``Conv1D`` layers (weight ``(in, out)``) become equivalent
``nn.Linear`` s, so LR, rank-1 noise and layer groups see ordinary linears. transformers is an optional
dependency (``pip install 'flops_ray[hf]'``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flops_ray.models.causal_lm import CausalLMScorer

PREFIX = "hf:"
"""Model names starting with this name a Hugging Face causal LM."""


def is_hf_model(name: str) -> bool:
    """Whether the model name ``name`` is a Hugging Face causal LM (``hf:...``)."""
    return name.startswith(PREFIX)


def hf_source(name: str) -> str:
    """The repository id or directory of ``hf:<source>`` (``name`` itself without the prefix)."""
    return name[len(PREFIX) :] if is_hf_model(name) else name


def transformers_module() -> Any:
    """The transformers package (an optional dependency).

    Raises:
        ImportError: it is not installed (naming the extra).
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("Hugging Face models (model: hf:...) need transformers: pip install 'flops_ray[hf]'") from exc
    return transformers


def linearise_conv1d(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` (``x W + b``, ``W (in, out)``) in ``model`` by the ``nn.Linear`` that
    computes the same (weight ``W^T``); returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in found:
        linear = nn.Linear(conv.nx, conv.nf, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return len(found)


def load_causal_lm(name_or_dir: str) -> CausalLMScorer:
    """The causal LM at ``name_or_dir`` (``hf:`` optional) in float32 and eval mode, wrapped as a
    :class:`~flops_ray.models.causal_lm.CausalLMScorer` (``estimator.precision`` sets the forwards' precision).

    Raises:
        ImportError: transformers is not installed (naming the extra).
    """
    source = hf_source(name_or_dir)
    lm = transformers_module().AutoModelForCausalLM.from_pretrained(source).float().eval()
    linearise_conv1d(lm)
    return CausalLMScorer(lm, source)


def load_tokenizer(name_or_dir: str) -> Any:
    """The tokenizer saved with the model at ``name_or_dir`` (``hf:`` optional)."""
    return transformers_module().AutoTokenizer.from_pretrained(hf_source(name_or_dir))
