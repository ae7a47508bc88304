"""Multimodal alignment (paper section 5.3): captioned-image data, the aligned model, its estimates and the job."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flops_ray.app.align import load_align_config, method_config
from flops_ray.config import ConfigError, EstimatorConfig, GroupConfig
from flops_ray.config.align import AlignSettings
from flops_ray.data.captions import CAPTION, CONTEXT, IMAGE, PAD, pack, read_captions, unpack, write_captions
from flops_ray.data.parquet import DatasetSchemaError
from flops_ray.data.shapes import shape_images
from flops_ray.estimators.prefix import find_cut
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models.aligner import AlignedLM, load_vision_encoder
from flops_ray.models.groups import resolve_groups
from flops_ray.models.hf import load_causal_lm, load_tokenizer
from flops_ray.models.losses import completion_loss
from flops_ray.replica.engine import QueryEngine
from flops_ray.studies.align_standin import AlignStandinSettings

transformers = pytest.importorskip("transformers")

CAPTIONS = ["1 plus 2 is 3", "4 plus 4 is 8", "7 plus 1 is 8", "2 plus 9 is 11", "5 plus 5 is 10", "3 plus 0 is 3"]
"""Captions in the tiny LMs' vocabulary (tests/conftest.py)."""


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> str:
    """A tiny CLIP vision tower (random weights) saved as a hub model is."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    path = tmp_path_factory.mktemp("encoder")
    transformers.CLIPVisionModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> tuple[str, str]:
    """Train and test Parquet files of shape images captioned in the tiny LMs' words."""
    root = tmp_path_factory.mktemp("captions")
    data = shape_images(24, seed=3, size=16)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(24)]
    return (
        str(write_captions(root / "train.parquet", data.images[:16], captions[:16])),
        str(write_captions(root / "test.parquet", data.images[16:], captions[16:])),
    )


def _aligned(encoder_dir: str, lm_dir: str, tokens: int = 1) -> AlignedLM:
    torch.manual_seed(1)
    return AlignedLM(load_vision_encoder(f"hf:{encoder_dir}"), load_causal_lm(f"hf:{lm_dir}").lm, tokens, 16)


# ---- data ---------------------------------------------------------------------------------------------------
def test_layout_puts_image_slots_after_the_leading_specials(tiny_lm_dirs, captioned):
    """A Llama tokenizer's BOS comes first, then the k image slots, the instruction (context), the caption and EOS
    (scored), then pads; GPT-2's has no BOS, so the image slots come first."""
    for kind, specials in (("llama", 1), ("gpt2", 0)):
        tokenizer = load_tokenizer(tiny_lm_dirs[kind])
        data, captions = read_captions(captioned[0], tokenizer, 16, visual_tokens=2, instruction="plus")
        pixels, ids, roles = unpack(torch.from_numpy(data.x), 16)
        assert pixels.shape == (16, 3, 16, 16) and int(pixels.max()) <= 255 and captions[0] == CAPTIONS[0]
        row = roles[0].tolist()
        caption = tokenizer([CAPTIONS[0]], add_special_tokens=False)["input_ids"][0] + [tokenizer.eos_token_id]
        head = [CONTEXT] * specials + [IMAGE, IMAGE, CONTEXT]
        assert row[: len(head) + len(caption)] == head + [CAPTION] * len(caption)
        assert set(row[len(head) + len(caption) :]) <= {PAD}
        assert ids[0, len(head) : len(head) + len(caption)].tolist() == caption
        if specials:
            assert ids[0, 0].item() == tokenizer.bos_token_id


def test_pack_round_trips():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)
    ids, roles = rng.integers(0, 50, (3, 6)), rng.integers(0, 4, (3, 6))
    pixels, ids2, roles2 = unpack(torch.from_numpy(pack(images, ids, roles)), 4)
    assert np.array_equal(pixels.numpy(), images) and np.array_equal(ids2.numpy(), ids)
    assert np.array_equal(roles2.numpy(), roles)
    with pytest.raises(ValueError, match="3\\*S\\*S"):
        unpack(torch.zeros(2, 3 * 16 + 1, dtype=torch.long), 4)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"image": [b"x"], "text": ["a"]}, "missing column 'caption'"),
        ({"image": [b"x"], "caption": [3]}, "column 'caption' has type int64"),
        ({"picture": [b"x"], "caption": ["a"]}, "missing column 'image'"),
        ({"image": [b"x", None], "caption": ["a", "b"]}, "row 1: null entry in column 'image'"),
    ],
)
def test_wrong_schema_is_named(tmp_path, tiny_lm_dirs, table, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(DatasetSchemaError, match=message):
        read_captions(path, load_tokenizer(tiny_lm_dirs["gpt2"]), 16, 1)


def test_a_corrupt_image_names_its_row(tmp_path, tiny_lm_dirs, captioned):
    good = pq.read_table(captioned[0]).slice(0, 2).to_pydict()
    good["image"][1] = b"\x89PNG broken"
    pq.write_table(pa.table(good), tmp_path / "corrupt.parquet")
    with pytest.raises(ValueError, match="row 1"):
        read_captions(tmp_path / "corrupt.parquet", load_tokenizer(tiny_lm_dirs["gpt2"]), 16, 1)


# ---- the model ----------------------------------------------------------------------------------------------
def test_the_adapter_is_the_cut_and_only_it_trains(encoder_dir, tiny_lm_dirs):
    model = _aligned(encoder_dir, tiny_lm_dirs["gpt2"], tokens=2)
    group = resolve_groups(model, (GroupConfig("adapter", ("adapter",), 0.1, 4),), linear_outputs=True)[0]
    assert find_cut(model, group) == "adapter"  # the encoder runs once per sample, below the group
    assert model.adapter.out_features == 2 * 64
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("adapter"))


def test_scores_are_minus_the_caption_loss_given_the_visual_tokens(encoder_dir, tiny_lm_dirs, captioned):
    """The score is minus the mean cross entropy of the caption tokens (and EOS) under the LM fed the embeddings
    with the adapter's output in the image slot, computed here by hand."""
    model = _aligned(encoder_dir, tiny_lm_dirs["gpt2"])
    tokenizer = load_tokenizer(tiny_lm_dirs["gpt2"])
    data, _ = read_captions(captioned[0], tokenizer, 16, 1)
    x = torch.from_numpy(data.x[:3])
    pixels, ids, roles = unpack(x, 16)
    with torch.no_grad():
        embeds = model.lm.get_input_embeddings()(ids).clone()
        embeds[:, 0] = model.adapter(model.encoder(pixels))
        logits = model.lm(inputs_embeds=embeds, attention_mask=(roles > 0).long()).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        scored = roles[:, 1:] == CAPTION
        want = -(ce * scored).sum(1) / scored.sum(1)
        torch.testing.assert_close(model(x)[:, 0], want)
    losses = completion_loss(model(x), torch.zeros(3))
    assert torch.allclose(losses, -want)


def test_generate_stops_at_eos_and_bounds_length(encoder_dir, tiny_lm_dirs, captioned):
    model = _aligned(encoder_dir, tiny_lm_dirs["gpt2"])
    data, _ = read_captions(captioned[1], load_tokenizer(tiny_lm_dirs["gpt2"]), 16, 1)
    tokens = model.generate(torch.from_numpy(data.x[:3]), max_new_tokens=5, eos_token_id=1)
    assert len(tokens) == 3 and all(len(t) <= 5 and 1 not in t for t in tokens)


def test_a_timm_encoder_by_name_gives_its_prelogits():
    encoder = load_vision_encoder("test_vit", pretrained=False)
    features = encoder(torch.randint(0, 256, (2, 3, 16, 16)))
    assert features.shape == (2, encoder.dim) and encoder.image_size == 160


# ---- the estimates ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lr", "spsa"])
def test_adapter_estimate_is_unbiased_against_backprop(encoder_dir, tiny_lm_dirs, captioned, kind):
    """The estimate of the caption loss's gradient in the adapter, through the frozen LM, against autograd's: z-scores
    of K = 40 block means (200 queries each) on 256 fixed coordinates, ``mean z^2`` near ``(K-1)/(K-3) = 1.05``
    with spread ``sqrt(2 sum R^2) / n`` (``R`` their correlation) and 4 sd allowed, and one t-statistic along the
    exact gradient, ``|t| < 4.5`` (as tests/test_hf_models.py). Float64 and sigma = 1e-3 keep the smoothing bias
    ~1e-6 of the gradient, far below the standard errors. LR perturbs the visual token, SPSA the adapter's weights;
    the encoder runs once per sample (the shared prefix)."""
    model = _aligned(encoder_dir, tiny_lm_dirs["gpt2"]).double()
    data, _ = read_captions(captioned[0], load_tokenizer(tiny_lm_dirs["gpt2"]), 16, 1)
    x, y = data.x[:2], data.y[:2]
    group = GroupConfig("adapter", ("adapter",), 1e-3, 2)
    engine = QueryEngine(model, (group,), EstimatorConfig(kind=kind, max_rows=128), 7, completion_loss)
    engine.set_batch(0, x, y)
    params = [p for _, p in engine.groups[0].params]
    with torch.enable_grad():
        loss = completion_loss(engine.model(torch.from_numpy(x[:1])), torch.from_numpy(y[:1])).sum()
        exact = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    blocks, per = 40, 200

    def block(k: int) -> torch.Tensor:
        item = ShardItem(0, 11, k * per, (k + 1) * per, loss.item())
        task = ShardTask(kind=TaskKind.MAIN, step=0, group=0, index=k, items=(item,), weights=(1.0 / per,))
        return torch.from_numpy(engine.run(task).grad)

    means = torch.stack([block(k) for k in range(blocks)]).double()
    coords = torch.randperm(len(exact), generator=torch.Generator().manual_seed(0))[:256]
    sub, true = means[:, coords], exact[coords]
    z2 = ((sub.mean(0) - true) / (sub.std(0) / blocks**0.5)) ** 2
    sd = (2 * (torch.corrcoef(sub.T) ** 2).sum()).sqrt().item() / len(true) * 1.05
    assert abs(z2.mean().item() - 1.05) < 4 * sd, f"mean z^2 = {z2.mean().item():.3f}, sd {sd:.3f}"
    along = means @ (exact / exact.norm())
    t = (along.mean() - exact.norm()) / (along.std() / blocks**0.5)
    assert abs(t.item()) < 4.5, f"along the gradient: t = {t.item():.2f}"


# ---- config and job -----------------------------------------------------------------------------------------
def test_methods_derive_from_the_ops_lr_config():
    settings, cfg = load_align_config("jobs/configs/align_standin.yaml")
    assert (cfg.estimator.kind, cfg.allocator.kind) == ("lr", "neyman")
    assert method_config(cfg, "lr", settings).allocator.kind == "equal"
    spsa = method_config(cfg, "spsa", settings)
    assert (spsa.estimator.kind, spsa.allocator.kind, spsa.groups[0].sigma) == ("spsa", "equal", settings.spsa_sigma)
    assert method_config(cfg, "bp", settings).backprop


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("methods", ("ops_lr", "adam"), "unknown method 'adam'"), ("visual_tokens", 0, "visual_tokens")],
)
def test_bad_settings_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        AlignSettings(**{field: value}).validate()


@pytest.mark.slow
def test_quick_job_runs_every_method_on_the_ray_farm(run_script, tmp_path):
    run_script("jobs/align.py", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "align.json").read_text())
    assert set(result["methods"]) == {"ops_lr", "lr", "spsa", "bp"}
    for figures in result["methods"].values():
        assert len(figures["losses"]) == 3 and all(np.isfinite(figures["losses"]))
        assert figures["peak_bytes"] >= 0 and figures["step_seconds"] > 0
        assert np.isfinite(figures["test_loss_before"]) and np.isfinite(figures["test_loss_after"])
    assert 0 <= result["allocator_share"] < 1
    assert len(result["captions"]["random_adapter"]) == len(result["captions"]["ops_lr"]) == 2
    resolved = load_align_config(tmp_path / "align_config.yaml")
    assert resolved[1].model.startswith("hf:") and resolved[0].encoder.startswith("hf:")


# ---- the captions converter ---------------------------------------------------------------------------------
def _image_folder(root) -> list[str]:
    from PIL import Image

    data = shape_images(5, seed=1, size=16)
    names = []
    for i, image in enumerate(data.images):
        (root / "img" / f"{i}").mkdir(parents=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(root / "img" / f"{i}" / "x.png")
        names.append(f"img/{i}/x.png")
    return names


def test_captions_file_converts_and_splits(tmp_path, tiny_lm_dirs):
    """JSON lines and LLaVA's JSON list (the caption is the first gpt turn) give the same Parquet; the last rows go
    to the sibling test file; what is written reads back as captioned samples."""
    from flops_ray.data.captions import captions_to_parquet

    names = _image_folder(tmp_path)
    (tmp_path / "caps.jsonl").write_text(
        "".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in zip(names, CAPTIONS))
    )
    llava = [
        {
            "id": str(i),
            "image": n,
            "conversations": [{"from": "human", "value": "<image>\nsay"}, {"from": "gpt", "value": c}],
        }
        for i, (n, c) in enumerate(zip(names, CAPTIONS))
    ]
    (tmp_path / "caps.json").write_text(json.dumps(llava))
    tables = []
    for name in ("caps.jsonl", "caps.json"):
        out = tmp_path / name.replace(".", "_") / "x_train.parquet"
        train, test = captions_to_parquet(tmp_path / name, tmp_path, out, test_rows=2)
        assert test.name == "x_test.parquet"
        tables.append((pq.read_table(train).to_pydict(), pq.read_table(test).to_pydict()))
    assert tables[0] == tables[1]
    assert tables[0][0]["caption"] == CAPTIONS[:3] and tables[0][1]["caption"] == CAPTIONS[3:5]
    data, captions = read_captions(train, load_tokenizer(tiny_lm_dirs["gpt2"]), 16, 1)
    assert len(data) == 3 and captions == CAPTIONS[:3]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "../outside.png", "caption": "a"}, "row 0: image '../outside.png' leads outside"),
        ({"image": "img/9/none.png", "caption": "a"}, "row 0: image 'img/9/none.png' is no file in"),
        ({"image": "img/0/x.png"}, "row 0 needs an image path and a caption"),
    ],
)
def test_captions_file_errors_name_the_row(tmp_path, row, message):
    from flops_ray.data.captions import captions_to_parquet

    _image_folder(tmp_path / "root")
    (tmp_path / "outside.png").write_bytes((tmp_path / "root" / "img" / "0" / "x.png").read_bytes())
    (tmp_path / "caps.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        captions_to_parquet(tmp_path / "caps.jsonl", tmp_path / "root", tmp_path / "out_train.parquet")
    assert not (tmp_path / "out_train.parquet").exists()


def test_convert_command_takes_a_captions_file(tmp_path, capsys):
    from flops_ray.app.cli import main

    names = _image_folder(tmp_path)
    rows = "".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in zip(names, CAPTIONS))
    (tmp_path / "caps.jsonl").write_text(rows)
    out = tmp_path / "c_train.parquet"
    argv = ["convert", "--captions", str(tmp_path / "caps.jsonl"), "--test-rows", "1", str(tmp_path), str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{out}: 4 captioned images",
        f"{tmp_path / 'c_test.parquet'}: 1 captioned images",
    ]


def test_the_standin_is_a_function_of_the_seed(tmp_path):
    """The same seed writes the same bytes (weights, images, captions); another seed other ones; the encoder and
    LM load back as hub models do."""
    from flops_ray.studies.align_standin import make_align_standin

    small = dataclasses.replace(
        AlignStandinSettings(train_size=16, test_size=4, encoder_steps=3),
        lm=dataclasses.replace(AlignStandinSettings().lm, pretrain_sentences=32, pretrain_steps=3),
    )
    runs = [make_align_standin(tmp_path / name, seed, small) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    files = ("encoder/model.safetensors", "lm/model.safetensors", "train.parquet", "test.parquet")
    same = [(runs[0].root / f).read_bytes() == (runs[1].root / f).read_bytes() for f in files]
    other = [(runs[0].root / f).read_bytes() == (runs[2].root / f).read_bytes() for f in files]
    assert all(same) and not any(other)
    assert load_vision_encoder(f"hf:{runs[0].encoder}").dim == small.encoder_width
    assert load_causal_lm(f"hf:{runs[0].lm}").lm.config.n_embd == small.lm.width
