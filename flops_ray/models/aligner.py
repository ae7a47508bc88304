"""A frozen vision encoder, a linear adapter and a frozen causal LM as one model of captioned images (paper section
5.3, appendix C.3: the feature-alignment stage of a vision-language model).

The adapter ``g`` maps the encoder's CLS feature to ``k`` visual tokens in the LM's embedding space,
``Z_v = g(ViT(I)_CLS)``, and the LM reads ``[Z_v, t_1 .. t_m]``; the loss is the LM's mean cross entropy over the
caption's tokens. The adapter is the only trained module (the group), so the encoder runs below it, once per sample
(the shared prefix of :mod:`flops_ray.estimators.prefix` fans the adapter's input out to a sample's queries), and
LR perturbs the adapter's output: the visual token. Samples are the packed rows of :mod:`flops_ray.data.captions`.

The encoder is a Hugging Face CLIP vision tower (``hf:<repo id or directory>``, its pooled CLS feature) or a timm
model by name (its pre-logits feature); the LM any Hugging Face causal LM (:func:`~flops_ray.models.hf.load_causal_lm`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flops_ray.data.captions import CAPTION, IMAGE, unpack
from flops_ray.models.causal_lm import (
    COMPLETION,
    CausalLMScorer,
    FannedRows,
    LMFeatures,
    completion_scores,
    completion_targets,
)
from flops_ray.models.hf import hf_source, is_hf_model, transformers_module

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""CLIP's pixel mean (RGB), the default where a tower's preprocessing does not say."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's pixel standard deviation (RGB)."""


class VisionEncoder(nn.Module):
    """A frozen image tower as ``pixels (B, 3, S, S)`` 0-255 -> CLS features ``(B, D)``: pixels are resized to the
    tower's side (bicubic) and normalised as its preprocessing does.

    Args:
        tower: a ``CLIPVisionModel`` (its ``pooler_output``) or a timm model (``forward_head(..., pre_logits=True)``).
        image_size: the tower's input side.
        dim: ``D``, the feature width.
        mean: per-channel pixel mean of the tower's preprocessing (on 0-1 pixels).
        std: per-channel standard deviation.
    """

    def __init__(self, tower: nn.Module, image_size: int, dim: int, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.tower = tower.eval().requires_grad_(False)
        self.image_size = image_size
        self.dim = dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255.0
        if x.shape[-1] != self.image_size:
            x = nn.functional.interpolate(x, size=self.image_size, mode="bicubic", antialias=True)
        x = (x - self.mean) / self.std
        if hasattr(self.tower, "forward_head"):
            return self.tower.forward_head(self.tower.forward_features(x), pre_logits=True)
        return self.tower(pixel_values=x).pooler_output


def load_vision_encoder(name: str, pretrained: bool = True) -> VisionEncoder:
    """The frozen encoder ``name`` names: ``hf:<repo id or directory>`` a CLIP vision tower through transformers'
    ``from_pretrained`` (a full CLIP checkpoint gives its vision half), else a timm model (its hub weights when
    ``pretrained``, through the Hugging Face cache as :mod:`flops_ray.models.timm_hub` reads them).

    Raises:
        ImportError: transformers is not installed (naming the extra).
    """
    if is_hf_model(name):
        transformers = transformers_module()
        source = hf_source(name)
        tower = transformers.CLIPVisionModel.from_pretrained(source).float()
        mean, std = _hf_normalisation(transformers, source)
        return VisionEncoder(tower, tower.config.image_size, tower.config.hidden_size, mean, std)
    import timm

    tower = timm.create_model(name, pretrained=pretrained, num_classes=0)
    cfg = tower.pretrained_cfg
    return VisionEncoder(tower, cfg["input_size"][-1], tower.num_features, cfg["mean"], cfg["std"])


def _hf_normalisation(transformers: Any, source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel mean and std of the image processor saved with ``source``; CLIP's where none was saved."""
    try:
        processor = transformers.CLIPImageProcessor.from_pretrained(source)
    except OSError:
        return CLIP_MEAN, CLIP_STD
    return tuple(processor.image_mean), tuple(processor.image_std)


class AlignedLM(FannedRows, nn.Module):
    """``x (B, 3*S*S + 2*T)`` captioned samples -> ``(B, 1)`` scores, minus each caption's mean cross entropy given
    the image's visual tokens (so :func:`~flops_ray.models.losses.completion_loss` with ``y = 0`` is the loss).

    Children in call order, encoder, adapter, LM: the adapter is the layer group and what runs before it is shared
    per sample. Only the adapter trains.

    Args:
        encoder: the frozen vision encoder.
        lm: the frozen causal LM (``get_input_embeddings``, and a call on ``inputs_embeds`` returning ``.logits``).
        visual_tokens: ``k``, the visual tokens per image (the paper: 1).
        image_size: ``S``, the side of the images as the samples hold them.
    """

    def __init__(self, encoder: VisionEncoder, lm: nn.Module, visual_tokens: int, image_size: int):
        super().__init__()
        self.encoder = encoder
        width = lm.get_input_embeddings().embedding_dim
        self.adapter = nn.Linear(encoder.dim, visual_tokens * width)
        self.lm = lm.eval().requires_grad_(False)
        self.visual_tokens = visual_tokens
        self.image_size = image_size

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LM's logits ``(R, T, V)`` on ``x``'s sequences with the visual tokens in their image slots, the rows
        as :func:`~flops_ray.models.causal_lm.completion_scores` reads them ``(R, 1, 2, T)`` (one row per output row:
        fanned out while a shared prefix runs), and the samples' CLS features ``(B, D)``."""
        pixels, ids, roles = unpack(x, self.image_size)
        features = self.encoder(pixels)
        visual = self.adapter(features)  # (R, k*E): the shared prefix fans rows out at the adapter's input
        ids, roles = self.per_row(ids), self.per_row(roles)
        embeds = self.lm.get_input_embeddings()(ids)
        slots = (roles == IMAGE)[..., None]
        embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype).view(len(ids), -1, embeds.shape[-1]))
        logits = self.lm(inputs_embeds=embeds, attention_mask=(roles > 0).long(), use_cache=False).logits
        # Caption tokens are scored; every other real token (specials, image slots, instruction) is context.
        role = torch.where(roles == CAPTION, COMPLETION, (roles > 0).long())
        return logits, torch.stack([ids, role], 1)[:, None], features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, rows, _ = self._run(x)
        return completion_scores(rows, logits)

    def forward_features(self, x: torch.Tensor) -> LMFeatures:
        """Scores and the CLS features in one pass (the clean pass reads both; the Gaussian allocator's kernel is
        the image's feature)."""
        logits, rows, features = self._run(x)
        return LMFeatures(completion_scores(rows, logits), features.float())

    forward_head = staticmethod(CausalLMScorer.forward_head)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(B,)`` whether greedy decoding reproduces each caption (every caption token is the argmax given the
        tokens before it)."""
        logits, rows, _ = self._run(x)
        targets, scored = completion_targets(rows)
        return ((logits[:, :-1].argmax(-1) == targets) | ~scored).all(1)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
        """Greedy captions of ``x``'s images: each sample's context (up to its first caption token) is extended one
        argmax token at a time, until ``eos_token_id`` or ``max_new_tokens``; returns the new tokens per sample."""
        pixels, ids, roles = unpack(x, self.image_size)
        visual = self.adapter(self.encoder(pixels)).view(len(x), self.visual_tokens, -1)
        embed = self.lm.get_input_embeddings()
        out = []
        for i in range(len(x)):
            head = int((roles[i] == CAPTION).long().argmax())  # the first caption position
            seq = embed(ids[i, :head])
            seq = seq.masked_scatter((roles[i, :head] == IMAGE)[:, None], visual[i].to(seq.dtype))
            tokens: list[int] = []
            while len(tokens) < max_new_tokens:
                token = int(self.lm(inputs_embeds=seq[None], use_cache=False).logits[0, -1].argmax())
                if token == eos_token_id:
                    break
                tokens.append(token)
                seq = torch.cat([seq, embed(torch.tensor([token], device=seq.device))])
            out.append(tokens)
        return out
