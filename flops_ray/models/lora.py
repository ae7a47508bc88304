"""Forward-only LoRA: a causal LM wrapped with ``peft`` adapters whose linears are the layer groups.

With ``lora.rank`` > 0 the driver wraps the LM (:func:`add_lora`) before anything else, so checkpoints and the
replicas (through the object store) hold the wrapped model. ``lora_B`` starts at zero, so the wrapped model scores
as the plain one. The default groups become each adapted layer's ``lora_A`` and ``lora_B`` linears
(:func:`lora_groups`): LR perturbs the adapters' outputs, SPSA/ES their parameters, and the base weights, in no
group, never change. peft is an optional dependency (``pip install 'flops_ray[lora]'``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from flops_ray.config import ConfigError, GroupConfig, LoraSettings, default_groups
from flops_ray.models.causal_lm import CausalLMScorer
from flops_ray.models.lm_groups import OUTPUT_PROJECTIONS, default_lm_groups
from flops_ray.seeding import STREAM_INIT, derive_seed

ADAPTERS = ("lora_A.default", "lora_B.default")
"""Module name suffixes of an adapted layer's two linears (peft's adapter ``default``)."""


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ImportError("LoRA adapters (lora.rank > 0) need peft: pip install 'flops_ray[lora]'") from exc
    return peft


def default_targets(model: CausalLMScorer) -> tuple[str, ...]:
    """The LM's default group modules (:func:`~flops_ray.models.lm_groups.default_lm_groups`), without ``lm.``."""
    return tuple(m.removeprefix("lm.") for g in default_lm_groups(model, default_groups()) for m in g.modules)


def add_lora(model: nn.Module, settings: LoraSettings, seed: int = 0) -> nn.Module:
    """``model`` with its LM wrapped by ``peft.get_peft_model`` (``lora_A`` initialised from ``seed``), or as it
    is when ``settings.rank`` is 0.

    Raises:
        ConfigError: ``model`` is no causal LM, or a target names no module of it.
        ImportError: peft is not installed (naming the extra).
    """
    if not settings.on:
        return model
    if not isinstance(model, CausalLMScorer):
        raise ConfigError(f"lora.rank: LoRA adapters are for causal LMs (model: hf:...), got {type(model).__name__}")
    peft = _peft()
    targets = settings.targets or default_targets(model)
    config = peft.LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, target_modules=list(targets), init_lora_weights=True
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, STREAM_INIT, 3))
        try:
            model.lm = peft.get_peft_model(model.lm, config)
        except ValueError as exc:
            raise ConfigError(f"lora.targets: {exc}") from exc
    return model


def adapted_layers(model: nn.Module) -> list[str]:
    """Names (in ``model``) of the layers holding an adapter, in module order."""
    suffix = "." + ADAPTERS[0]
    return [name.removesuffix(suffix) for name, _ in model.named_modules() if name.endswith(suffix)]


def lora_groups(model: nn.Module, groups: tuple[GroupConfig, ...]) -> tuple[GroupConfig, ...]:
    """``groups`` for a LoRA-wrapped LM: in place of the defaults, the adapters' ``lora_A``/``lora_B`` linears; with
    the default targets one group per default group (``mlp``, ``attn``, their sigma and budget kept), else one
    group ``lora`` of every adapter (the first default group's sigma and budget). Other groups stay as they are."""
    if tuple(g.modules for g in groups) != tuple(g.modules for g in default_groups()):
        return groups
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError("lora.targets: the model holds no LoRA adapter")
    per_layer = {layer: tuple(f"{layer}.{a}" for a in ADAPTERS) for layer in layers}
    kind_of = {_kind(layer): layer for layer in layers}
    if len(layers) == len(OUTPUT_PROJECTIONS) == len(groups) and set(kind_of) == {k for k, _ in OUTPUT_PROJECTIONS}:
        return tuple(
            dataclasses.replace(base, name=kind, modules=per_layer[kind_of[kind]])
            for base, (kind, _) in zip(groups, OUTPUT_PROJECTIONS, strict=True)
        )
    modules = tuple(m for ms in per_layer.values() for m in ms)
    return (dataclasses.replace(groups[0], name="lora", modules=modules),)


def _kind(layer: str) -> str | None:
    """The default group (``mlp``, ``attn``) whose output projection ``layer`` is, if any."""
    for kind, candidates in OUTPUT_PROJECTIONS:
        if any(layer.endswith("." + rel) for rel in candidates):
            return kind
    return None
