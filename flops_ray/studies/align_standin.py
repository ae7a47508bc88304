"""The alignment job's stand-in, made locally from the seed: captioned shape images, a vision encoder and a causal LM.

No hub is reachable, so :func:`make_align_standin` makes what the paper's setting has (CLIP ViT-L/14, Vicuna-7B,
LCS558K), small, and saves it where the job loads the real ones from:

- ``train.parquet`` / ``test.parquet``: shape images with their captions (:mod:`flops_ray.data.shapes`), the
  columns ``image`` and ``caption`` any captioned dataset has (and the labels, unused by training).
- ``encoder/``: a CLIP vision tower from its Hugging Face config, pretrained by backprop to tell each image's shape,
  colour and place from its CLS feature, saved with ``save_pretrained`` beside its image processor.
- ``lm/``: a GPT-2 and word-level tokenizer pretrained by backprop on the caption language, each caption read after
  one position holding the sum of the embeddings of its colour, shape and place words
  (:func:`~flops_ray.data.standin_lm.pretrain`): a tiny LM's embedding space has no token for "a red square at the
  top left" as a 7B model's has room for, so the stand-in learns to read one.

The frozen LM then captions well only if the adapter turns the encoder's CLS feature into such a token: the
alignment is the whole task. Everything derives from the root seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flops_ray.data.captions import write_captions
from flops_ray.data.shapes import COLOURS, PLACES, SHAPES, ShapeImages, caption, shape_images
from flops_ray.data.standin_lm import StandinSettings, one_thread, pretrain, word_tokenizer
from flops_ray.models.aligner import CLIP_MEAN, CLIP_STD, VisionEncoder
from flops_ray.seeding import STREAM_DATA, STREAM_INIT, derive_seed

_ALIGN = 0x414C
"""Counter that keeps the stand-in's draws apart from other users of the same streams."""


@dataclass(frozen=True)
class AlignStandinSettings:
    """Sizes of the stand-in's data, encoder and LM."""

    image_size: int = 32
    """Side of the images."""
    train_size: int = 2048
    """Captioned images in ``train.parquet``."""
    test_size: int = 256
    """Captioned images in ``test.parquet`` (drawn apart from the training images)."""
    encoder_width: int = 64
    """The CLIP vision tower's hidden size."""
    encoder_layers: int = 2
    """Its transformer layers."""
    encoder_patch: int = 8
    """Its patch side."""
    encoder_steps: int = 300
    """Backprop steps of the encoder's pretraining (batches of 64)."""
    lm: StandinSettings = field(default_factory=lambda: StandinSettings(pretrain_sentences=4000, pretrain_steps=500))
    """The LM's size and pretraining (its ``pretrain_sentences`` captions)."""


@dataclass(frozen=True)
class AlignStandinPaths:
    """Where :func:`make_align_standin` writes."""

    root: Path
    encoder: Path
    lm: Path
    train: Path
    test: Path

    @classmethod
    def under(cls, root: str | Path) -> AlignStandinPaths:
        root = Path(root)
        return cls(root, root / "encoder", root / "lm", root / "train.parquet", root / "test.parquet")


def summary_words(data: ShapeImages) -> list[list[str]]:
    """Each image's colour, shape and place words (``["red", "square", "top", "left"]``)."""
    colours = list(COLOURS)
    return [[colours[c], SHAPES[s], *PLACES[p].split()[2:]] for s, c, p in zip(data.shape, data.colour, data.place)]


def vocabulary() -> tuple[str, ...]:
    """Every word of every caption."""
    words = {
        w
        for s in range(len(SHAPES))
        for c in range(len(COLOURS))
        for p in range(len(PLACES))
        for w in caption(s, c, p).split()
    }
    return tuple(sorted(words))


def pretrain_encoder(data: ShapeImages, settings: AlignStandinSettings, seed: int) -> nn.Module:
    """A ``CLIPVisionModel`` trained by backprop so that linear heads on its CLS feature tell each image's shape,
    colour and place; the tower alone is returned, in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        image_size=settings.image_size,
        patch_size=settings.encoder_patch,
        hidden_size=settings.encoder_width,
        intermediate_size=2 * settings.encoder_width,
        num_hidden_layers=settings.encoder_layers,
        num_attention_heads=4,
    )
    images = torch.from_numpy(data.images)
    labels = [torch.from_numpy(t) for t in (data.shape, data.colour, data.place)]
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, STREAM_INIT, _ALIGN))
        encoder = VisionEncoder(CLIPVisionModel(config), settings.image_size, settings.encoder_width)
        encoder.tower.requires_grad_(True).train()
        heads = nn.ModuleList(nn.Linear(settings.encoder_width, n) for n in (len(SHAPES), len(COLOURS), len(PLACES)))
        opt = torch.optim.AdamW([*encoder.tower.parameters(), *heads.parameters()], lr=3e-3, weight_decay=0.01)
        gen = torch.Generator().manual_seed(derive_seed(seed, STREAM_DATA, _ALIGN, 2))
        for _ in range(settings.encoder_steps):
            idx = torch.randint(len(images), (64,), generator=gen)
            features = encoder(images[idx])
            loss = sum(nn.functional.cross_entropy(h(features), y[idx]) for h, y in zip(heads, labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return encoder.tower.eval()


def make_align_standin(
    out_dir: str | Path, seed: int, settings: AlignStandinSettings = AlignStandinSettings()
) -> AlignStandinPaths:
    """Write the stand-in under ``out_dir`` (see the module docstring); returns its paths."""
    from transformers import CLIPImageProcessor

    paths = AlignStandinPaths.under(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    size = settings.image_size
    train = shape_images(settings.train_size, derive_seed(seed, STREAM_DATA, _ALIGN, 0), size)
    test = shape_images(settings.test_size, derive_seed(seed, STREAM_DATA, _ALIGN, 1), size)
    for path, data in ((paths.train, train), (paths.test, test)):
        labels = {"shape": data.shape, "colour": data.colour, "place": data.place}
        write_captions(path, data.images, data.captions(), **labels)
    tower = pretrain_encoder(train, settings, seed)
    tower.save_pretrained(paths.encoder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor.save_pretrained(paths.encoder)
    text = shape_images(settings.lm.pretrain_sentences, derive_seed(seed, STREAM_DATA, _ALIGN, 3), 4)
    tokenizer = word_tokenizer(vocabulary())
    lm = pretrain(tokenizer, text.captions(), settings.lm, derive_seed(seed, _ALIGN), summary_words(text))
    lm.save_pretrained(paths.lm)
    tokenizer.save_pretrained(paths.lm)
    return paths
