"""``pretrained: true``: timm's hub weights read offline from a Hugging Face cache; the field's types on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants

from flops_ray.app.job_config import load_config
from flops_ray.config import ConfigError, TrainConfig
from flops_ray.config.plain import config_from_dict, config_to_dict
from flops_ray.models.factory import create_model
from flops_ray.models.timm_hub import HubWeightsError

NAME = "test_vit"
"""timm's smallest ViT (0.3M parameters); its pretrained weights live in the hub repository :data:`REPO`."""
REPO = timm.models.get_pretrained_cfg(NAME).hf_hub_id
REVISION = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(home: Path) -> dict[str, torch.Tensor]:
    """Put a pretrained ``NAME`` in ``home``'s hub cache as the hub would (``model.safetensors``, ``config.json``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = timm.create_model(NAME)
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    # The cache's layout: refs/main names the commit whose snapshot holds the files.
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    timm.models.save_for_hf(model, str(repo / "snapshots" / REVISION), safe_serialization=True)
    return model.state_dict()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """``HF_HOME`` at an empty cache under ``tmp_path`` and ``HF_HUB_OFFLINE=1``; returns the cache's home."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both once, when it is imported: set what that import would have made of them.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_timm_weights_come_from_the_offline_cache_with_the_seeds_head(offline_hub):
    hub = fill_hub_cache(offline_hub)
    loaded = create_model(NAME, 3, 32, seed=0, pretrained=True).state_dict()
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], hub["blocks.0.attn.qkv.weight"])
    assert torch.equal(loaded["patch_embed.proj.weight"], hub["patch_embed.proj.weight"])
    # timm leaves out the 1000-class head for the run's 3 classes: the head is the one the seed initialises.
    assert torch.equal(loaded["head.weight"], create_model(NAME, 3, 32, seed=0).state_dict()["head.weight"])


def test_a_cache_miss_names_the_model_and_the_cache(offline_hub):
    with pytest.raises(HubWeightsError) as caught:
        create_model(NAME, 3, 32, seed=0, pretrained=True)
    message = str(caught.value)
    assert f"of {NAME} (hub repository {REPO})" in message
    assert f"HF_HOME={offline_hub}" in message and "HF_HUB_OFFLINE=1" in message
    # No chained huggingface_hub traceback under it.
    assert caught.value.__suppress_context__ and caught.value.__cause__ is None


def test_flops_rays_own_models_have_no_hub_weights():
    with pytest.raises(ConfigError, match=r"^pretrained: .*digits_vit is flops_ray's own model"):
        create_model("digits_vit", 10, 8, seed=0, pretrained=True)


@pytest.mark.parametrize("value", [True, False, "", "~/weights.safetensors"])
def test_pretrained_loads_and_round_trips(value):
    cfg = config_from_dict({"pretrained": value})
    assert cfg.pretrained == value and type(cfg.pretrained) is type(value)
    # A checkpoint's header holds the config as JSON.
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


@pytest.mark.parametrize("value", [3, 1.5, None, ["a"]])
def test_pretrained_of_another_type_is_refused(value):
    with pytest.raises(ConfigError, match=r"^pretrained: must be true"):
        config_from_dict({"pretrained": value})
    with pytest.raises(ConfigError, match=r"^pretrained: "):
        TrainConfig(pretrained=value).validate()


def test_set_pretrained_true_is_the_hub():
    cfg, _ = load_config(None, ["pretrained=true"])
    assert cfg.pretrained is True
    assert load_config(None, ["pretrained=w.safetensors"])[0].pretrained == "w.safetensors"
