"""The embedded default for vision-language prompt tuning: a small CLIP pretrained contrastively on captioned
synthetic images, made locally, and few-shot classification tasks it does imperfectly zero-shot.

No hub is reachable, so :func:`make_standin_clip` makes what one would give: a ``CLIPModel`` built from its
Hugging Face config and trained by backprop (CLIP's symmetric contrastive loss) on :mod:`~flops_ray.data.shapes`'
captioned shapes and coloured digits, saved with ``save_pretrained`` beside a word-level tokenizer
(:func:`~flops_ray.data.standin_lm.word_tokenizer` with a BOS added) and a ``CLIPImageProcessor``, so that
``CLIPModel`` / ``AutoTokenizer`` / ``AutoImageProcessor.from_pretrained`` load the folder as they would
``openai/clip-vit-base-patch32``. Every caption names the colour and the object (and a shape's place), each after
one of a few neutral openings; the class prompts of the tasks (``"a photo of a seven."``) name one attribute only,
which is why zero-shot falls short of what a tuned prompt reaches.

The tasks (:data:`TASKS`): ``digits`` (the digit of a coloured digit, 10 classes), ``digit_colours`` (its
colour, 4), ``shapes`` (the shape, 4), ``colours`` (the colour of a shape, 4), ``places`` (where the shape is, 5),
``low_res_places`` (the same scenes drawn at :data:`LOW_RES` pixels, 5), ``rows`` (the shape's row: top, centre or
bottom, 3) and ``shape_places`` (the shape and where it is, 20). Each has a ``shots``-per-class training set and a disjoint test set, from
images the pretraining never saw. Everything derives from the seed: the same seed writes the same bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flops_ray.data.shapes import COLOURS, DIGIT_WORDS, PLACES, SHAPES, digit_images, shape_images
from flops_ray.data.standin_lm import word_tokenizer
from flops_ray.seeding import STREAM_DATA, STREAM_INIT, derive_seed

_STANDIN = 0x434C
"""Counter that keeps the stand-in CLIP's draws apart from other users of the same streams."""
OPENINGS = ("", "a picture of", "an image showing", "here we see", "this drawing shows", "in this picture there is")
"""Neutral openings of the pretraining captions: they vary the captions' length and carry no label. The longest
caption ends at position 13, so a class text after a 12-token prompt reads some untrained position embeddings
(chains of openings that reach them made a CLIP whose manual prompt left tuning less room: docs/RESULTS.md)."""
MANUAL_WORDS = ("photo", "of", ".")
"""Words of the manual prompt the captions never use: in the vocabulary, as a hub tokenizer's would be."""
TASKS = ("digits", "digit_colours", "shapes", "colours", "places", "low_res_places", "rows", "shape_places")
"""The stand-in's classification tasks."""
PLACE_NAMES = tuple(p.removeprefix("at the ").removeprefix("in the ") for p in PLACES)
"""A place's class name (``"top left"``, ..., ``"centre"``), by label."""
LOW_RES = 16
"""Side in pixels at which ``low_res_places`` draws its scenes (the image processor upscales them to the CLIP's
side): the places question on images blurrier than any the pretraining showed."""
ROW_NAMES = ("top", "centre", "bottom")
"""A ``rows`` class name (the row a shape is in), by label."""
PLACE_ROWS = np.array([0, 0, 2, 2, 1])
"""The ``rows`` label of each place: the top and bottom corners share their row, the centre is the middle row."""
SHAPE_PLACE_NAMES = tuple(f"{shape} {place}" for shape in SHAPES for place in PLACES)
"""A ``shape_places`` class name (``"square at the top left"``), label ``shape * len(PLACES) + place``: the
captions' own words for what and where, so the class texts differ in two attributes at once."""
BOS = "<bos>"
"""The text's start token (CLIP's text CLS), after which the text prompt goes."""


@dataclass(frozen=True)
class StandinCLIPSettings:
    """Sizes of the stand-in CLIP, its pretraining and its tasks."""

    image_size: int = 32
    """Image side in pixels (the vision tower's ``image_size``)."""
    patch_size: int = 8
    """Patch side: ``(image_size / patch_size)^2`` patch tokens."""
    width: int = 64
    """Hidden size of both towers and of the joint embedding."""
    layers: int = 2
    """Transformer layers of each tower."""
    heads: int = 4
    """Attention heads of each tower."""
    max_text: int = 32
    """Text positions (``max_position_embeddings``): room for a 12-token prompt before the class words."""
    shape_captions: int = 6000
    """Captioned shape images of the pretraining."""
    digit_repeats: int = 4
    """Times each digit image enters the pretraining pairs (each with its own caption opening): the digits' train
    split is a fifth the size of the shapes', and a digit is harder to tell from a few pixels than a colour."""
    pretrain_steps: int = 500
    """Backprop steps of contrastive pretraining."""
    batch_size: int = 128
    """Image-caption pairs per pretraining step (each pair's negatives are the batch's others)."""
    lr: float = 3e-3
    """AdamW's peak learning rate: linear warm-up over the first tenth, then linear decay to zero."""


def vocabulary() -> tuple[str, ...]:
    """Every word of the captions and of the manual prompt, in a fixed order."""
    words = [*COLOURS, *SHAPES, *DIGIT_WORDS, "a", *MANUAL_WORDS]
    for phrase in (*PLACES, *OPENINGS):
        words += phrase.split()
    return tuple(dict.fromkeys(words))


def clip_tokenizer():
    """The word-level tokenizer with a BOS, splitting punctuation off words (``"seven."`` is two tokens)."""
    from tokenizers import pre_tokenizers

    tokenizer = word_tokenizer(vocabulary())
    tokenizer.add_special_tokens({"bos_token": BOS})
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def class_names(task: str) -> tuple[str, ...]:
    """The class words of ``task``, in label order."""
    names = {
        "digits": DIGIT_WORDS,
        "digit_colours": tuple(COLOURS),
        "shapes": SHAPES,
        "colours": tuple(COLOURS),
        "places": PLACE_NAMES,
        "low_res_places": PLACE_NAMES,
        "rows": ROW_NAMES,
        "shape_places": SHAPE_PLACE_NAMES,
    }
    if task not in names:
        raise ValueError(f"task: must be one of {', '.join(TASKS)}, got {task!r}")
    return names[task]


def _with_opening(rng: random.Random, caption: str) -> str:
    opening = rng.choice(OPENINGS)
    return f"{opening} {caption}".strip()


def pretraining_pairs(settings: StandinCLIPSettings, seed: int) -> tuple[np.ndarray, list[str]]:
    """``(N, 3, S, S)`` uint8 images and their captions: shapes ("a red square at the top left") and the digits'
    train split ("a blue seven"), each caption after a random opening."""
    shapes = shape_images(settings.shape_captions, derive_seed(seed, STREAM_DATA, _STANDIN, 0), settings.image_size)
    digits, digit, colour = digit_images("train", derive_seed(seed, STREAM_DATA, _STANDIN, 1), settings.image_size)
    rng = random.Random(derive_seed(seed, STREAM_DATA, _STANDIN, 2))
    captions = [_with_opening(rng, c) for c in shapes.captions()]
    reps = settings.digit_repeats
    words = [f"a {list(COLOURS)[c]} {DIGIT_WORDS[d]}" for d, c in zip(digit, colour)]
    captions += [_with_opening(rng, w) for _ in range(reps) for w in words]
    return np.concatenate([shapes.images, *[digits] * reps]), captions


def task_split(
    task: str, shots: int, test_size: int, seed: int, size: int = 32
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(images, labels)`` of ``task``'s few-shot training set (``shots`` per class, the first drawn) and of its
    test set (``test_size`` images, or all that are left of the digits' test split), from images the pretraining
    never saw. Shape images are drawn until every class has its shots (a many-class task needs more than
    ``classes x shots + test_size``)."""
    names = class_names(task)
    if task in ("digits", "digit_colours"):
        images, digit, colour = digit_images("test", derive_seed(seed, STREAM_DATA, _STANDIN, 3), size)
        labels = digit if task == "digits" else colour
    else:
        pool = len(names) * shots + test_size
        base, side = ("places", LOW_RES) if task == "low_res_places" else (task, size)  # the same scenes, fewer pixels
        while True:
            data = shape_images(pool, derive_seed(seed, STREAM_DATA, _STANDIN, 4), side)
            images, by_task = data.images, {"shapes": data.shape, "colours": data.colour, "places": data.place}
            by_task["rows"] = PLACE_ROWS[data.place]
            labels = by_task[base] if base in by_task else data.shape * len(PLACES) + data.place  # shape_places
            if np.bincount(labels, minlength=len(names)).min() >= shots or pool > 64 * len(names) * shots:
                break
            pool *= 2
    order = np.random.default_rng(derive_seed(seed, STREAM_DATA, _STANDIN, 5)).permutation(len(labels))
    train = np.concatenate([order[labels[order] == c][:shots] for c in range(len(names))])
    if len(train) < len(names) * shots:
        raise ValueError(f"task {task!r}: fewer than {shots} images of some class to train on")
    rest = np.setdiff1d(order, train, assume_unique=True)
    test = order[np.isin(order, rest)][:test_size]
    return (images[train], labels[train]), (images[test], labels[test])


def image_processor(settings: StandinCLIPSettings):
    """A ``CLIPImageProcessor`` for the stand-in's image size (OpenAI CLIP's mean and std)."""
    from transformers import CLIPImageProcessor

    side = settings.image_size
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def preprocess(processor, images: np.ndarray) -> torch.Tensor:
    """``(N, 3, S, S)`` uint8 images -> the processor's ``(N, 3, S', S')`` float32 pixel values."""
    return processor(images=list(images), return_tensors="pt", input_data_format="channels_first")["pixel_values"]


def _config(tokenizer, settings: StandinCLIPSettings):
    from transformers import CLIPConfig

    tower = {
        "hidden_size": settings.width,
        "intermediate_size": 2 * settings.width,
        "num_hidden_layers": settings.layers,
        "num_attention_heads": settings.heads,
    }
    text = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": settings.max_text,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**tower, "image_size": settings.image_size, "patch_size": settings.patch_size}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=settings.width)


def pretrain_clip(settings: StandinCLIPSettings, seed: int):
    """A ``CLIPModel`` trained by backprop with CLIP's contrastive loss on :func:`pretraining_pairs`, in eval mode;
    returns it with its tokenizer and image processor."""
    from transformers import CLIPModel

    tokenizer, processor = clip_tokenizer(), image_processor(settings)
    images, captions = pretraining_pairs(settings, seed)
    pixels = preprocess(processor, images)
    encoded = tokenizer(captions, padding=True, return_tensors="pt")
    # BOS and EOS around each caption, as CLIP's tokenizer adds them; pads after the EOS.
    ids = torch.nn.functional.pad(encoded["input_ids"], (1, 1), value=tokenizer.pad_token_id)
    mask = torch.nn.functional.pad(encoded["attention_mask"], (1, 1))
    lengths = encoded["attention_mask"].sum(1)
    ids[:, 0], mask[:, 0] = tokenizer.bos_token_id, 1
    ids[torch.arange(len(ids)), lengths + 1], mask[torch.arange(len(ids)), lengths + 1] = tokenizer.eos_token_id, 1
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        # One thread: a CPU reduction's order, hence the weights' last bits, can depend on the thread count.
        torch.set_num_threads(1)
        try:
            torch.manual_seed(derive_seed(seed, STREAM_INIT, _STANDIN))
            model = CLIPModel(_config(tokenizer, settings))
            opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
            steps, warm = settings.pretrain_steps, max(settings.pretrain_steps // 10, 1)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min((s + 1) / warm, (steps - s) / max(steps - warm, 1))
            )
            gen = torch.Generator().manual_seed(derive_seed(seed, STREAM_DATA, _STANDIN, 6))
            for _ in range(steps):
                idx = torch.randint(len(ids), (settings.batch_size,), generator=gen)
                out = model(input_ids=ids[idx], attention_mask=mask[idx], pixel_values=pixels[idx], return_loss=True)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                schedule.step()
        finally:
            torch.set_num_threads(threads)
    return model.eval(), tokenizer, processor


def make_standin_clip(out_dir: str | Path, seed: int, settings: StandinCLIPSettings = StandinCLIPSettings()) -> Path:
    """Pretrain the stand-in CLIP and write it, its tokenizer and its image processor to ``out_dir`` (one folder,
    as a hub model's); returns ``out_dir``."""
    out_dir = Path(out_dir)
    model, tokenizer, processor = pretrain_clip(settings, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
