"""Layer groups of a causal LM: the defaults (the last block's MLP and attention output projections), and the rule
that no group trains a weight tied to the input embeddings.

A config that keeps the project's default groups (the digits ViT's, which name no module of an LM) trains
an LM's last block: its MLP output projection (GPT-2 ``mlp.c_proj``, Llama/Qwen/Mistral ``mlp.down_proj``, OPT
``fc2``) and its attention output projection (``attn.c_proj``, ``self_attn.o_proj``, ``self_attn.out_proj``),
one linear per group as the ViT's defaults are, each with the sigma and budget of the default group it replaces.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from flops_ray.config import ConfigError, GroupConfig, default_groups
from flops_ray.models.groups import resolve_groups

OUTPUT_PROJECTIONS = (
    ("mlp", ("mlp.c_proj", "mlp.down_proj", "fc2", "mlp.fc2", "mlp.dense_4h_to_h")),
    ("attn", ("attn.c_proj", "self_attn.o_proj", "self_attn.out_proj", "self_attn.dense", "attention.dense")),
)
"""Group name -> the module names, relative to a block, of that output projection in the families known."""


def _blocks(model: nn.Module) -> str:
    """The name of the model's stack of blocks: its longest ``nn.ModuleList``."""
    stacks = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        raise ConfigError(f"groups: {type(model).__name__} has no stack of blocks to choose default groups from")
    return max(stacks, key=lambda s: s[0])[1]


def _tied(model: nn.Module) -> set[int]:
    """``id`` of the input embedding weight (an output head tied to it shares it)."""
    lm = getattr(model, "lm", model)
    embeddings = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    return {id(embeddings.weight)} if embeddings is not None else set()


def default_lm_groups(model: nn.Module, like: tuple[GroupConfig, ...]) -> tuple[GroupConfig, ...]:
    """The last block's output projections of ``model``, group ``i`` with ``like[i]``'s sigma and budget.

    Raises:
        ConfigError: the model has no block holding a known output projection.
    """
    stack = _blocks(model)
    block_name = f"{stack}.{len(model.get_submodule(stack)) - 1}"
    modules = dict(model.get_submodule(block_name).named_modules())
    tied = _tied(model)
    found = []
    for kind, candidates in OUTPUT_PROJECTIONS:
        for rel in candidates:
            module = modules.get(rel)
            if isinstance(module, nn.Linear) and id(module.weight) not in tied:
                found.append((kind, f"{block_name}.{rel}"))
                break
    if not found:
        names = ", ".join(n for n, m in modules.items() if isinstance(m, nn.Linear))
        raise ConfigError(f"groups: no known output projection in {block_name} (linears: {names}); set groups")
    return tuple(
        dataclasses.replace(base, name=kind, modules=(name,)) for (kind, name), base in zip(found, like, strict=False)
    )


def lm_groups(model: nn.Module, groups: tuple[GroupConfig, ...]) -> tuple[GroupConfig, ...]:
    """``groups`` for a causal LM: :func:`default_lm_groups` in place of groups that name the default modules
    (the digits ViT's, sigma and budgets kept), else ``groups`` as they are.

    Raises:
        ConfigError: a group holds a weight tied to the input embeddings (GPT-2's ``lm_head``): an estimate of its
            gradient as the head would miss its use as the embedding.
    """
    if tuple(g.modules for g in groups) == tuple(g.modules for g in default_groups()):
        groups = default_lm_groups(model, groups)
    tied = _tied(model)
    for group in resolve_groups(model, groups, linear_outputs=False):
        names = [n for n, p in group.params if id(p) in tied]
        if names:
            raise ConfigError(
                f"groups[{group.config.name}].modules: {names[0]} is tied to the input embeddings; "
                "train another module (an estimate of its gradient as the head misses its use as the embedding)"
            )
    return groups
