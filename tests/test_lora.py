"""Forward-only LoRA (``lora.rank`` > 0): ``peft`` adapters on a tiny GPT-2 are the groups; the base never moves."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from flops_ray.app.run import build  # noqa: E402
from flops_ray.config import ConfigError, DataConfig, EstimatorConfig, LoraSettings, TrainConfig  # noqa: E402
from flops_ray.config.plain import config_from_dict  # noqa: E402
from flops_ray.models.factory import create_model  # noqa: E402
from flops_ray.models.lora import add_lora  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_dir(tiny_lm_dirs) -> str:
    """The saved tiny GPT-2 and its word-level tokenizer (conftest.py)."""
    return tiny_lm_dirs["gpt2"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    """16 prompt-completion sums (no test split)."""
    rng = np.random.default_rng(0)
    rows = [(int(a), int(b)) for a, b in rng.integers(0, 20, (16, 2))]
    path = tmp_path_factory.mktemp("text") / "train.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{a} plus {b} is", "completion": str(a + b)}) + "\n" for a, b in rows)
    )
    return str(path)


def _x() -> torch.Tensor:
    x = torch.randint(3, 40, (2, 1, 2, 6), generator=torch.Generator().manual_seed(0))
    x[:, :, 1] = torch.tensor([1, 1, 1, 2, 2, 0])
    return x


def test_wrapped_model_scores_as_the_plain_one_and_pickles(gpt2_dir):
    x = _x()
    want = create_model(f"hf:{gpt2_dir}", 10, 8, 0)(x)
    model = add_lora(create_model(f"hf:{gpt2_dir}", 10, 8, 0), LoraSettings(rank=4), seed=0)
    assert any(n.endswith("lora_B.default") for n, _ in model.named_modules())
    assert torch.equal(model(x), want)  # lora_B starts at zero
    copy = pickle.loads(pickle.dumps(model))  # replicas get it through the object store
    assert torch.equal(copy(x), want)
    assert torch.equal(model.forward_features(x).scores, want)


@pytest.mark.parametrize("estimator", ["lr", "spsa"])
def test_training_moves_only_the_adapters(gpt2_dir, train_file, estimator):
    cfg = TrainConfig(
        model=f"hf:{gpt2_dir}",
        data=DataConfig(dataset=train_file),
        estimator=EstimatorConfig(kind=estimator),
        lora=LoraSettings(rank=4, alpha=8.0),
        batch_size=8,
        steps=3,
        eval_every=0,
    )
    with build(cfg) as trainer:
        assert [g.name for g in trainer.cfg.groups] == ["mlp", "attn"]
        assert all(m.endswith(("lora_A.default", "lora_B.default")) for g in trainer.cfg.groups for m in g.modules)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        reports = trainer.fit()
        assert all(np.isfinite(r.loss) for r in reports)
        after = dict(trainer.model.named_parameters())
    base = [n for n in before if ".lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".lora_B." in n)


@pytest.mark.parametrize(
    ("lora", "field"),
    [
        ({"rank": -1}, "lora.rank"),
        ({"rank": 4, "alpha": 0}, "lora.alpha"),
        ({"rank": 4, "targets": ["lm.transformer.h.1.mlp.c_proj"]}, r"lora.targets\[0\]"),
    ],
)
def test_bad_settings_name_the_field(gpt2_dir, lora, field):
    with pytest.raises(ConfigError, match=field):
        config_from_dict({"model": f"hf:{gpt2_dir}", "lora": lora}).validate()


def test_lora_needs_a_causal_lm():
    with pytest.raises(ConfigError, match=r"lora.rank: .*hf:"):
        TrainConfig(lora=LoraSettings(rank=4)).validate()


def test_a_target_naming_no_module_names_the_field(gpt2_dir):
    with pytest.raises(ConfigError, match=r"lora\.targets"):
        add_lora(create_model(f"hf:{gpt2_dir}", 10, 8, 0), LoraSettings(rank=2, targets=("no_such_proj",)))
