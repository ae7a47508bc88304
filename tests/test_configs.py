"""Every job config loads, validates, binds its layer groups to its model, and shows its submit command."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import torch

from flops_ray.app.align import load_align_config
from flops_ray.app.job_config import add_train_arguments, load_config, read_config
from flops_ray.config import ConfigError
from flops_ray.estimators import estimator_family
from flops_ray.models.aligner import AlignedLM, VisionEncoder
from flops_ray.models.causal_lm import CausalLMScorer
from flops_ray.models.factory import create_model
from flops_ray.models.groups import resolve_groups
from flops_ray.models.hf import is_hf_model, linearise_conv1d
from flops_ray.models.lm_groups import lm_groups

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


def test_the_documented_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"digits_ops_lr", "digits_ops_spsa", "digits_bp", "vit_b16_cifar100"} <= names


def _tiny_lm(name: str) -> CausalLMScorer:
    """A tiny causal LM of the family ``hf:name`` names (OPT, Llama, else GPT-2 as the stand-in): its module names
    are the real model's, nothing is downloaded."""
    transformers = pytest.importorskip("transformers")
    small = {"vocab_size": 32, "max_position_embeddings": 16}
    if "opt" in name:
        lm = transformers.OPTForCausalLM(
            transformers.OPTConfig(
                hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16, **small
            )
        )
    elif "llama" in name.lower():
        lm = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, **small
            )
        )
    else:
        lm = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
        )
    linearise_conv1d(lm)
    return CausalLMScorer(lm, name)


def _tiny_aligned(visual_tokens: int) -> AlignedLM:
    """A tiny encoder-adapter-LM model: the module names of any alignment config's model."""
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    encoder = VisionEncoder(transformers.CLIPVisionModel(vision), 16, 16)
    return AlignedLM(encoder, _tiny_lm("gpt2").lm, visual_tokens, 16)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_groups_bind_to_the_model(path):
    if "align" in read_config(path):
        # An alignment config: its own section beside the training fields, groups of the aligned model.
        settings, cfg = load_align_config(path)
        model = _tiny_aligned(settings.visual_tokens)
    elif is_hf_model((cfg := load_config(path)[0]).model):
        # A causal LM's groups bind as the run binds them: the LM's defaults in place of the digits ViT's.
        model = _tiny_lm(cfg.model)
        cfg = cfg.replace(groups=lm_groups(model, cfg.groups))
    else:
        # Same architecture, built on the meta device: no weights, no pretraining, no memory.
        name = "digits_vit" if cfg.model == "digits_vit_pretrained" else cfg.model
        with torch.device("meta"):
            model = create_model(name, cfg.data.num_classes, cfg.data.img_size, cfg.seed)
    linear = not cfg.backprop and estimator_family(cfg.estimator, model).linear_outputs
    groups = resolve_groups(model, cfg.groups, linear)
    trained = [name for g in groups for name, _ in g.params]
    # Each parameter trains in one group only, and LR trains exactly the matched linears' weights and biases.
    assert len(trained) == len(set(trained)) and set(trained) <= dict(model.named_parameters()).keys()
    if linear:
        modules = dict(model.named_modules())
        assert all(isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.Linear) for n in trained)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_header_holds_the_submit_command(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ray job submit "), "the first line must be the ray job submit command"
    tokens = shlex.split(lines[0][1:])
    assert tokens[:3] == ["ray", "job", "submit"] and "--working-dir" in tokens
    entry = tokens[tokens.index("--") + 1 :]
    assert entry[0] == "python" and (ROOT / entry[1]).is_file()
    parser = argparse.ArgumentParser()
    add_train_arguments(parser, default_config=None)
    args = parser.parse_args(entry[2:])
    assert args.config == f"jobs/configs/{path.name}"
    assert args.out


VLM_CONFIGS = sorted((ROOT / "jobs" / "configs" / "vlm").glob("*.yaml"))
"""Configs of jobs/vlm_prompt_tuning.py: the fields of its VLMPromptConfig, not a TrainConfig."""


@pytest.mark.parametrize("path", VLM_CONFIGS, ids=lambda p: p.stem)
def test_vlm_config_loads_and_its_header_runs_it(path, monkeypatch):
    from flops_ray.studies.vlm_prompts import METHODS, load_vlm_config

    cfg = load_vlm_config(path)
    assert set(cfg.methods) == set(METHODS) and (cfg.text_tokens, cfg.image_tokens) == (12, 10)
    tokens = shlex.split(path.read_text().splitlines()[0][1:])
    assert tokens[:3] == ["ray", "job", "submit"] and "--working-dir" in tokens
    entry = tokens[tokens.index("--") + 1 :]
    assert entry[:2] == ["python", "jobs/vlm_prompt_tuning.py"]
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import vlm_prompt_tuning

    args = vlm_prompt_tuning.parser().parse_args(entry[2:])
    assert args.config == f"jobs/configs/vlm/{path.name}" and args.out


def test_vlm_paper_config_is_the_paper_setting():
    from flops_ray.studies.vlm_prompts import load_vlm_config

    cfg = load_vlm_config(ROOT / "jobs" / "configs" / "vlm" / "clip_b32_paper.yaml")
    assert cfg.model == "hf:openai/clip-vit-base-patch32" and cfg.text_dim + cfg.image_dim == 1000
    assert (cfg.shots, cfg.queries_per_sample, cfg.batch_size, cfg.optimizer, cfg.lr) == (16, 60, 64, "adam", 1e-4)
    assert cfg.epochs == 50 and all(d.train.endswith(".parquet") and d.test.endswith(".parquet") for d in cfg.datasets)


def test_default_is_ops_lr_on_digits():
    cfg, _ = load_config(ROOT / "jobs" / "configs" / "digits_ops_lr.yaml")
    assert (cfg.estimator.kind, cfg.allocator.kind, cfg.data.dataset) == ("lr", "gaussian", "digits")
    default, _ = load_config(None)
    # Groups, sigmas, budgets and lr are left to flops_ray's defaults.
    assert (cfg.groups, cfg.lr, cfg.batch_size) == (default.groups, default.lr, default.batch_size)


def test_vit_config_is_the_paper_setting():
    cfg, _ = load_config(ROOT / "jobs" / "configs" / "vit_b16_cifar100.yaml")
    assert cfg.model == "vit_base_patch16_224" and cfg.data.num_classes == 100 and cfg.data.img_size == 224
    assert [g.sigma for g in cfg.groups] == [1e-5, 1e-4, 1e-3, 1e-3]
    assert [g.name for g in cfg.groups][-1] == "head"
    assert {g.queries_per_sample for g in cfg.groups} == {20}
    assert (cfg.batch_size, cfg.optimizer, cfg.lr) == (128, "adam", 1e-4)
    assert cfg.pretrained and cfg.data.dataset.endswith(".parquet") and cfg.data.test_dataset.endswith(".parquet")
    assert cfg.farm.backend == "ray" and cfg.farm.num_gpus_per_replica >= 1


def test_overrides():
    cfg, job = load_config(
        None,
        ["steps=10", "allocator.kind=equal", "groups.1.sigma=1e-3", "job.checkpoint_every=5", "farm.backend=ray"],
    )
    assert (cfg.steps, cfg.allocator.kind, cfg.groups[1].sigma, job.checkpoint_every) == (10, "equal", 1e-3, 5)
    assert cfg.farm.backend == "ray"


@pytest.mark.parametrize(
    "override, match",
    [
        ("stepz=3", r"unknown keys \['stepz'\]"),
        ("allocator.kind=best", r"allocator\.kind: must be one of"),
        ("groups.7.sigma=1", r"groups\.7 is not an index"),
        ("job.checkpoint_evry=3", r"job: unknown keys \['checkpoint_evry'\]"),
        ("job.log_every=0", r"job\.log_every: must be >= 1"),
        ("steps", r"expected key=value"),
    ],
)
def test_bad_overrides_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_file_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("estimator:\n  kind: lr\n  sigma: 0.1\n")
    with pytest.raises(ConfigError, match=r"estimator: unknown keys \['sigma'\]"):
        load_config(path)


def test_an_old_key_in_an_override_is_renamed():
    with pytest.warns(FutureWarning, match=r"farm\.workers is now farm\.replicas"):
        cfg, _ = load_config(None, ["farm.workers=3"])
    assert cfg.farm.replicas == 3
