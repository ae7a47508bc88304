"""Model registry: flops_ray's own small models by name, ``hf:...`` to Hugging Face, any other name to timm.

>>> model = create_model("digits_vit", num_classes=10, img_size=8, seed=0)
>>> sum(p.numel() for p in model.parameters())
202186
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from flops_ray.config import require
from flops_ray.config.registry import Registry
from flops_ray.seeding import STREAM_INIT, derive_seed

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", also="or a timm model name")
"""Model name -> factory; a name not here goes to timm."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator adding a model factory under its function name (timm's registry pattern)."""
    return MODELS.register()(fn)


@register_model
def digits_vit(num_classes: int = 10, img_size: int = 8, **kwargs) -> nn.Module:
    """The embedded default: a 4-block ViT on 8x8 one-channel digits (2x2 patches, 16 tokens + CLS)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size,
        patch_size=2,
        in_chans=1,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_classes=num_classes,
        **kwargs,
    )


@register_model
def digits_mixer(num_classes: int = 10, img_size: int = 8, **kwargs) -> nn.Module:
    """A second model family for the allocation evidence: a 6-block MLP-Mixer on 8x8 one-channel digits (2x2
    patches, 16 tokens, width 64: about the digits ViT's size)."""
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(
        num_classes=num_classes,
        img_size=img_size,
        in_chans=1,
        patch_size=2,
        num_blocks=6,
        embed_dim=64,
        **kwargs,
    )


@functools.lru_cache(maxsize=4)
def _pretrained_digits_state(arch: str, seed: int, img_size: int, steps: int) -> dict[str, torch.Tensor]:
    from flops_ray.data.arrays import digits

    model = MODELS[arch](num_classes=5, img_size=img_size)
    train = digits("train", img_size)
    keep = train.y < 5
    x, y = torch.from_numpy(train.x[keep]), torch.from_numpy(train.y[keep])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(derive_seed(seed, STREAM_INIT, 1))
    for _ in range(steps):
        idx = torch.randint(len(y), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pretrained_on_digits(arch: str, num_classes: int, img_size: int, pretrain_steps: int, **kwargs) -> nn.Module:
    """The registered ``arch`` pretrained by backprop on digits 0-4 only, with a fresh head for ``num_classes``."""
    seed = torch.initial_seed()
    model = MODELS[arch](num_classes=5, img_size=img_size, **kwargs)
    model.load_state_dict(_pretrained_digits_state(arch, seed, img_size, pretrain_steps))
    # Re-seed: the head must not depend on whether the pretrained state came from the cache.
    torch.manual_seed(derive_seed(seed, STREAM_INIT, 2))
    model.reset_classifier(num_classes)
    return model


@register_model
def digits_vit_pretrained(num_classes: int = 10, img_size: int = 8, pretrain_steps: int = 600, **kwargs) -> nn.Module:
    """``digits_vit`` pretrained by backprop on digits 0-4 only, with a fresh head for ``num_classes``.

    A local stand-in for the paper's setting (fine-tuning a pretrained ViT on a downstream task) that
    needs no hub, made by seconds of backprop and cached per process. Its features leave a linear probe on all
    ten digits well short of perfect, so forward-only fine-tuning has something to improve (docs/RESULTS.md).
    """
    return _pretrained_on_digits("digits_vit", num_classes, img_size, pretrain_steps, **kwargs)


@register_model
def digits_mixer_pretrained(num_classes: int = 10, img_size: int = 8, pretrain_steps: int = 600, **kwargs) -> nn.Module:
    """``digits_mixer`` pretrained like ``digits_vit_pretrained`` (digits 0-4, a fresh head)."""
    return _pretrained_on_digits("digits_mixer", num_classes, img_size, pretrain_steps, **kwargs)


def create_model(
    name: str, num_classes: int, img_size: int, seed: int, pretrained: bool = False, **kwargs
) -> nn.Module:
    """Create a model with weights initialised from the root seed.

    Args:
        name: a flops_ray model (``digits_vit``), any timm model name, or ``hf:<repo id or directory>``, a
            Hugging Face causal LM with its own weights (:mod:`flops_ray.models.hf`; the other arguments do not apply).
        num_classes: classifier outputs.
        img_size: input side in pixels.
        seed: root seed; the initial weights derive from it.
        pretrained: a timm model's pretrained weights from the Hugging Face cache (downloaded unless
            ``HF_HUB_OFFLINE=1``); a head for other classes stays the seed's (:mod:`flops_ray.models.timm_hub`).
    """
    if name.startswith("hf:"):
        from flops_ray.models.hf import load_causal_lm

        return load_causal_lm(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, STREAM_INIT))
        if name in MODELS:
            require(not pretrained, "pretrained", f"true reads timm's hub weights; {name} is flops_ray's own model")
            return MODELS[name](num_classes=num_classes, img_size=img_size, **kwargs)
        import timm

        from flops_ray.models.timm_hub import timm_model

        if not timm.is_model(name):
            raise MODELS.unknown(name)
        return timm_model(name, num_classes, img_size, pretrained, **kwargs)
