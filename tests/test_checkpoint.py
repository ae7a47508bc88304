"""Checkpoints: exact resume, atomic writes, and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import os

import pytest
import torch

from flops_ray.config import AllocatorConfig, EstimatorConfig, GroupConfig, TrainConfig
from flops_ray.config.plain import config_to_dict
from flops_ray.models.factory import create_model
from flops_ray.training.checkpoint import (
    CheckpointError,
    load_model_state,
    read_checkpoint,
)
from flops_ray.training.state import config_mismatch
from flops_ray.training.trainer import Trainer
from flops_ray.training.weights import load_pretrained, save_state_dict

GROUPS = (
    GroupConfig("top", ("blocks.3.mlp.fc2",), sigma=0.05, queries_per_sample=4),
    GroupConfig("head", ("head",), sigma=0.1, queries_per_sample=4),
)


@pytest.fixture(scope="module")
def data(digits_splits):
    return digits_splits


def _cfg(**kw) -> TrainConfig:
    base = {
        "model": "digits_vit",
        "groups": GROUPS,
        "batch_size": 16,
        "steps": 6,
        "allocator": AllocatorConfig(kind="gaussian", gaussian_iters=3, gaussian_draws=8),
    }
    return TrainConfig(**{**base, **kw})


def _trainer(cfg: TrainConfig, data, resume_from=None) -> Trainer:
    model = create_model(cfg.model, cfg.data.num_classes, cfg.data.img_size, cfg.seed)
    if resume_from is not None:
        load_model_state(model, resume_from)
    tr = Trainer(cfg, model, *data)
    if resume_from is not None:
        tr.resume(resume_from)
    return tr


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"estimator": EstimatorConfig(kind="spsa"), "optimizer": "sgd", "allocator": AllocatorConfig(kind="bernoulli")},
        {"backprop": True},
    ],
    ids=["lr-gaussian-adam", "spsa-bernoulli-sgd", "bp"],
)
def test_resume_is_exact(tmp_path, data, kw):
    """2N steps straight == N steps, save, load into a fresh trainer, N more (parameters and optimizer)."""
    cfg = _cfg(**kw)
    straight = _trainer(cfg, data)
    straight.fit(4)

    first = _trainer(cfg, data)
    first.fit(2)
    path = first.save(tmp_path / "ck.safetensors")
    resumed = _trainer(cfg, data, resume_from=path)
    assert resumed.step_count == 2
    resumed.fit(2)

    for a, b in zip(straight.params, resumed.params):
        assert torch.equal(a, b)
    for a, b in zip(straight.allocators, resumed.allocators):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k])
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(v, sb[i][k]) if isinstance(v, torch.Tensor) else v == sb[i][k]


def test_resume_may_change_steps_and_farm(tmp_path, data):
    first = _trainer(_cfg(), data)
    first.step()
    path = first.save(tmp_path / "ck.safetensors")
    longer = _cfg(steps=50, eval_every=7)
    assert _trainer(longer, data, resume_from=path).step_count == 1


def test_different_config_is_named(tmp_path, data):
    first = _trainer(_cfg(), data)
    path = first.save(tmp_path / "ck.safetensors")
    model = create_model("digits_vit", 10, 8, 0)
    other = Trainer(_cfg(lr=1e-2), model, *data)
    with pytest.raises(CheckpointError, match=r"different config: lr: 0\.002 -> 0\.01"):
        other.resume(path)


def test_a_field_newer_than_the_checkpoint_is_read_as_its_default():
    """A run saved before ``estimator.noise`` existed behaved as its default: it resumes at the default only."""
    saved = config_to_dict(_cfg())
    del saved["estimator"]["noise"]
    assert config_mismatch(saved, _cfg()) == []
    rank1 = _cfg(estimator=EstimatorConfig(noise="rank1"))
    assert config_mismatch(saved, rank1) == ["estimator.noise: 'gaussian' -> 'rank1'"]


def test_different_model_is_named(tmp_path, data):
    first = _trainer(_cfg(), data)
    path = first.save(tmp_path / "ck.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch head\.weight"):
        load_model_state(create_model("digits_vit", 7, 8, 0), path)


def test_frozen_weights_must_be_loaded_first(tmp_path, data):
    first = _trainer(_cfg(), data)
    path = first.save(tmp_path / "ck.safetensors")
    model = create_model("digits_vit", 10, 8, seed=1)  # other frozen weights, same config otherwise
    tr = Trainer(_cfg(), model, *data)
    with pytest.raises(CheckpointError, match=r"frozen weights .* load_model_state"):
        tr.resume(path)


def test_truncated_and_corrupt_files(tmp_path, data):
    first = _trainer(_cfg(), data)
    first.step()
    path = first.save(tmp_path / "ck.safetensors")
    raw = path.read_bytes()

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(cut)

    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # a byte of tensor data: the header still parses, the checksum does not match
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(bad)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(garbage)

    plain = tmp_path / "plain.safetensors"
    save_state_dict({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a flops_ray checkpoint"):
        read_checkpoint(plain)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_failed_write_keeps_last_good_checkpoint(tmp_path, data, monkeypatch):
    tr = _trainer(_cfg(), data)
    path = tr.save(tmp_path / "ck.safetensors")
    before = path.read_bytes()
    tr.step()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        tr.save(path)
    assert path.read_bytes() == before
    assert read_checkpoint(path).step == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]  # no temp file left behind


def test_load_pretrained_formats_and_errors(tmp_path):
    src = create_model("digits_vit", 10, 8, seed=3)
    st, pt, nested = tmp_path / "w.safetensors", tmp_path / "w.pt", tmp_path / "nested.pth"
    save_state_dict(src.state_dict(), st)
    torch.save(src.state_dict(), pt)
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, nested)
    for path in (st, pt, nested):
        dst = create_model("digits_vit", 10, 8, seed=4)
        assert load_pretrained(dst, path) == []
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))

    # Another number of classes: the fresh head is kept, everything else is loaded.
    dst = create_model("digits_vit", 5, 8, seed=4)
    assert load_pretrained(dst, st) == ["head.weight", "head.bias"]
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointError, match=r"shape mismatch head\.weight"):
        load_pretrained(create_model("digits_vit", 5, 8, seed=4), st, fresh_head=False)

    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}
    save_state_dict(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys blocks\.1\."):
        load_pretrained(create_model("digits_vit", 10, 8, 0), tmp_path / "partial.safetensors")

    save_state_dict({**src.state_dict(), "extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys extra\.weight"):
        load_pretrained(create_model("digits_vit", 10, 8, 0), tmp_path / "extra.safetensors")


def test_load_pretrained_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(create_model("digits_vit", 10, 8, 0), path)
