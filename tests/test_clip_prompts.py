"""The CLIP black box: the manual prompt is plain CLIP, prompts enter where the paper puts them, rows are
independent, and the stand-in round-trips through ``from_pretrained`` as a hub model would."""

from __future__ import annotations

import pytest
import torch

from flops_ray import BlackBox
from flops_ray.data import standin_clip
from flops_ray.models.clip_prompts import CLIPPromptLoss, encode_texts, load_clip
from flops_ray.studies.vlm_prompts import VLMPromptConfig, prompt_box, prompt_projection

transformers = pytest.importorskip("transformers")

TINY = standin_clip.StandinCLIPSettings(width=16, heads=2, pretrain_steps=2, shape_captions=40, batch_size=16)
CLASSES = ("square", "circle", "triangle")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A barely pretrained stand-in written and loaded back (model, tokenizer, image processor), and its folder."""
    folder = standin_clip.make_standin_clip(tmp_path_factory.mktemp("clip"), seed=0, settings=TINY)
    return (*load_clip(f"hf:{folder}"), folder)


def _loss(clip, tokenizer) -> CLIPPromptLoss:
    ids, eos = encode_texts(tokenizer, [f"{c}." for c in CLASSES])
    return CLIPPromptLoss(clip, ids, eos, text_tokens=3, image_tokens=2)


def _pixels(processor, n: int = 5) -> torch.Tensor:
    return standin_clip.preprocess(processor, standin_clip.shape_images(n, seed=1, size=TINY.image_size).images)


def test_standin_loads_like_a_hub_model(standin):
    clip, tokenizer, processor, folder = standin
    assert isinstance(clip, transformers.CLIPModel) and not any(p.requires_grad for p in clip.parameters())
    # The tokenizer splits the manual prompt's period off and knows its words; BOS and EOS frame every text.
    ids, eos = encode_texts(tokenizer, ["a photo of a seven."])
    words = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert words == ["<bos>", "a", "photo", "of", "a", "seven", ".", "<eos>"] and eos.tolist() == [7]
    assert _pixels(processor).shape == (5, 3, TINY.image_size, TINY.image_size)
    # The same seed writes the same weights.
    again = standin_clip.make_standin_clip(folder.parent / "again", seed=0, settings=TINY)
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_manual_prompt_is_plain_clip(standin):
    clip, tokenizer, processor, _ = standin
    ids, eos = encode_texts(tokenizer, [f"a photo of a {c}." for c in CLASSES])
    pixels = _pixels(processor)
    with torch.no_grad():
        ours = _loss(clip, tokenizer).manual_logits(ids, eos, pixels)
        theirs = clip(input_ids=ids, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_prompts_go_after_the_bos_and_after_the_patches(standin):
    """A text prompt of real word embeddings is the same text with those words after the BOS; an image prompt
    changes the image embedding but not the patch tokens before it."""
    clip, tokenizer, processor, _ = standin
    loss = _loss(clip, tokenizer)
    words = ["a", "picture", "of"]
    with_words, _ = encode_texts(tokenizer, [f"a picture of {c}." for c in CLASSES])
    p_text = clip.text_model.embeddings.token_embedding(torch.tensor(tokenizer.convert_tokens_to_ids(words)))
    pixels = _pixels(processor)
    with torch.no_grad():
        theta = torch.cat([p_text.flatten(), torch.zeros(loss.image_tokens * loss.image_width)])
        prompted = loss.text_features(loss.split(theta[None])[0])[0]
        plain = torch.nn.functional.normalize(clip.get_text_features(input_ids=with_words).pooler_output, dim=-1)
        torch.testing.assert_close(prompted, plain, rtol=1e-4, atol=1e-5)
        p_image = torch.randn(len(pixels), loss.image_tokens, loss.image_width)
        assert not torch.allclose(loss.image_features(pixels, p_image), loss.image_features(pixels, None))


def test_rows_are_independent_and_shared_texts_are_encoded_once(standin):
    """The batched loss of many prompt rows equals each row alone (the deduplicated text pass included)."""
    clip, tokenizer, processor, _ = standin
    loss = _loss(clip, tokenizer)
    pixels = _pixels(processor, 4)
    y = torch.tensor([0, 1, 2, 0])
    thetas = torch.randn(4, loss.prompt_size) * 0.1
    thetas[2] = thetas[0]  # two rows share a prompt
    with torch.no_grad():
        batched = loss(thetas, pixels, y)
        alone = torch.cat([loss(thetas[r : r + 1], pixels[r : r + 1], y[r : r + 1]) for r in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_the_box_projects_text_and_image_prompts_apart(standin):
    clip, tokenizer, _, _ = standin
    cfg = VLMPromptConfig(text_dim=4, image_dim=3, text_tokens=3, image_tokens=2)
    loss = _loss(clip, tokenizer)
    box = prompt_box(cfg, loss, torch.zeros(loss.prompt_size), seed=0)
    assert isinstance(box, BlackBox) and box.search.value.shape == (7,) and box.fn is loss
    text_size = 3 * loss.text_width
    w = prompt_projection(cfg, text_size, loss.prompt_size - text_size, seed=0)
    assert torch.equal(box.projection, w)
    # z's first d_T numbers move only the text prompt, the rest only the image prompt.
    assert w[:4, text_size:].abs().sum() == 0 and w[4:, :text_size].abs().sum() == 0
    # N(0, 1/d_T): the sample sd of n normals is off by a relative 1/sqrt(2n) sd; 4 of those are allowed.
    block = w[:4, :text_size]
    assert block.std().item() == pytest.approx(0.5, rel=4 / (2 * block.numel()) ** 0.5)


def test_the_compositional_task_names_each_shape_at_each_place():
    """``shape_places``: label ``shape * 5 + place`` names that shape at that place; 16 shots of every class and a
    test set of other images, as the one-attribute tasks have."""
    names = standin_clip.class_names("shape_places")
    assert len(names) == 20 and names[1] == "square at the top right" and names[5].startswith("circle")
    (x, y), (tx, ty) = standin_clip.task_split("shape_places", 16, 100, seed=0, size=16)
    assert sorted(set(y.tolist())) == list(range(20)) and all((y == c).sum() == 16 for c in range(20))
    assert len(ty) == 100 and set(ty.tolist()) <= set(range(20)) and not (x[:, None] == tx[None]).all((2, 3, 4)).any()


def test_low_res_places_ask_the_places_question_at_fewer_pixels():
    """``low_res_places``: the labels and split of ``places`` (the same draws of shape, colour and place), each image
    drawn at ``LOW_RES`` pixels and upscaled to the CLIP's side by its processor; ``rows`` merges the top and
    bottom corners into their rows and has its own 16 shots of each."""
    assert standin_clip.class_names("low_res_places") == standin_clip.class_names("places")
    (x, y), (_, ty) = standin_clip.task_split("places", 16, 50, seed=0)
    (lx, ly), (ltx, lty) = standin_clip.task_split("low_res_places", 16, 50, seed=0)
    side = standin_clip.LOW_RES
    assert x.shape[1:] == (3, 32, 32) and lx.shape[1:] == ltx.shape[1:] == (3, side, side)
    assert (ly == y).all() and (lty == ty).all() and all((ly == c).sum() == 16 for c in range(5))
    processor = standin_clip.image_processor(standin_clip.StandinCLIPSettings())
    assert standin_clip.preprocess(processor, lx[:2]).shape == (2, 3, 32, 32)
    (_, ry), (_, rty) = standin_clip.task_split("rows", 16, 50, seed=0)
    assert standin_clip.class_names("rows") == ("top", "centre", "bottom")
    assert all((ry == c).sum() == 16 for c in range(3)) and set(rty.tolist()) <= {0, 1, 2}
