"""Hugging Face causal LMs (``model: hf:DIR``) fine-tuned forward-only on prompt-completion text.

Tiny GPT-2 and Llama models (about 100k parameters, a 64-word vocabulary) are built from their configs and
saved with ``save_pretrained`` beside a word-level tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flops_ray.app.run import build, fit_to_model, load_datasets  # noqa: E402
from flops_ray.config import ConfigError, DataConfig, EstimatorConfig, GroupConfig, TrainConfig  # noqa: E402
from flops_ray.data.parquet import DatasetSchemaError  # noqa: E402
from flops_ray.data.text import read_text  # noqa: E402
from flops_ray.messages import ShardItem, ShardTask, TaskKind  # noqa: E402
from flops_ray.models.causal_lm import CausalLMScorer  # noqa: E402
from flops_ray.models.factory import create_model  # noqa: E402
from flops_ray.models.hf import load_tokenizer  # noqa: E402
from flops_ray.models.lm_groups import lm_groups  # noqa: E402
from flops_ray.models.losses import completion_loss  # noqa: E402
from flops_ray.replica.engine import QueryEngine  # noqa: E402

KINDS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def lm_dirs(tiny_lm_dirs) -> dict[str, str]:
    """``kind -> directory`` of a saved tiny LM and its tokenizer (conftest.py)."""
    return tiny_lm_dirs


def _rows(n: int, seed: int, choices: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, 20, 2))
        row = {"prompt": f"{a} plus {b} is", "completion": str(a + b)}
        if choices:
            row["choices"] = [str(a + b), str((a + b + 1) % 40), str(abs(a - b))]
        rows.append(row)
    return rows


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> str:
    """``train.jsonl`` (prompt, completion) with a sibling ``test.jsonl`` holding choices; returns the train path."""
    root = tmp_path_factory.mktemp("text")
    _write_jsonl(root / "test.jsonl", _rows(12, 1, choices=True))
    return _write_jsonl(root / "train.jsonl", _rows(32, 0, choices=False))


def _config(lm_dir: str, dataset: str, kind: str = "lr", **changes) -> TrainConfig:
    data = DataConfig(dataset=dataset)
    return TrainConfig(model=f"hf:{lm_dir}", data=data, estimator=EstimatorConfig(kind=kind), **changes)


# ---- loading -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_loads_through_hf_name_and_pickles(lm_dirs, kind):
    model = create_model(f"hf:{lm_dirs[kind]}", 10, 8, 0)
    assert isinstance(model, CausalLMScorer) and model.source == lm_dirs[kind]
    assert 70_000 < sum(p.numel() for p in model.parameters()) < 130_000
    x = torch.randint(3, 40, (2, 1, 2, 6))
    x[:, :, 1] = torch.tensor([1, 1, 1, 2, 2, 0])
    # Replicas get the model through the object store: it pickles, tokenizer-free, and scores the same after.
    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(copy(x), model(x))


def test_without_transformers_the_error_names_the_extra(lm_dirs, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'flops_ray\[hf\]'"):
        create_model(f"hf:{lm_dirs['gpt2']}", 10, 8, 0)


def test_gpt2_conv1d_becomes_a_linear_with_the_same_logits(lm_dirs):
    from transformers.pytorch_utils import Conv1D

    model = create_model(f"hf:{lm_dirs['gpt2']}", 10, 8, 0)
    original = transformers.AutoModelForCausalLM.from_pretrained(lm_dirs["gpt2"]).eval()
    assert any(isinstance(m, Conv1D) for m in original.modules())
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert isinstance(model.get_submodule("lm.transformer.h.1.mlp.c_proj"), torch.nn.Linear)
    ids = torch.randint(3, 40, (3, 9))
    with torch.no_grad():
        # addmm with W against linear with W^T: the same products, summed alike (float32 rounding at most).
        torch.testing.assert_close(model.lm(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "mlp", "attn"),
    [
        ("gpt2", "lm.transformer.h.1.mlp.c_proj", "lm.transformer.h.1.attn.c_proj"),
        ("llama", "lm.model.layers.1.mlp.down_proj", "lm.model.layers.1.self_attn.o_proj"),
    ],
)
def test_default_groups_are_the_last_blocks_output_projections(lm_dirs, kind, mlp, attn):
    model = create_model(f"hf:{lm_dirs[kind]}", 10, 8, 0)
    defaults = TrainConfig().groups
    groups = lm_groups(model, defaults)
    assert [(g.name, g.modules) for g in groups] == [("mlp", (mlp,)), ("attn", (attn,))]
    assert [(g.sigma, g.queries_per_sample) for g in groups] == [(g.sigma, g.queries_per_sample) for g in defaults]
    mine = (GroupConfig("mine", ("lm.*.0.mlp.*",), 0.01, 4),)
    assert lm_groups(model, mine) == mine


def test_a_group_tied_to_the_embeddings_is_refused(lm_dirs):
    model = create_model(f"hf:{lm_dirs['gpt2']}", 10, 8, 0)
    with pytest.raises(ConfigError, match=r"groups\[head\].*tied to the input embeddings"):
        lm_groups(model, (GroupConfig("head", ("lm.lm_head",), 0.1, 4),))


# ---- data ----------------------------------------------------------------------------------------------
def test_text_splits_tokenise_into_candidate_rows(lm_dirs, text_files):
    model = create_model(f"hf:{lm_dirs['llama']}", 10, 8, 0)
    train, test = load_datasets(DataConfig(dataset=text_files, num_classes=2), model)
    assert train.x.dtype == np.int64 and train.x.shape[:3] == (32, 1, 2) and not train.y.any()
    assert test.x.shape[:3] == (12, 3, 2) and test.y.tolist() == [0] * 12  # the completion is the first choice
    ids, role = train.x[0, 0]
    assert ids[0] == 2 and role[0] == 1  # <bos>, then the prompt
    assert set(role.tolist()) <= {0, 1, 2} and (np.diff(role[role > 0]) >= 0).all()  # prompt, completion, pads


def test_a_parquet_text_file_reads_as_its_jsonl(lm_dirs, text_files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in Path(text_files).with_name("test.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    model = create_model(f"hf:{lm_dirs['gpt2']}", 10, 8, 0)
    _, want = load_datasets(DataConfig(dataset=text_files), model)
    _, got = load_datasets(DataConfig(dataset=text_files, test_dataset=str(tmp_path / "test.parquet")), model)
    assert np.array_equal(got.x, want.x) and np.array_equal(got.y, want.y)


def test_a_causal_lm_and_image_data_do_not_mix(lm_dirs):
    with pytest.raises(ConfigError, match="a causal LM trains on text"):
        load_datasets(DataConfig(dataset="digits"), create_model(f"hf:{lm_dirs['gpt2']}", 10, 8, 0))


def test_bad_text_data_names_the_problem(lm_dirs, tmp_path):
    tokenizer = load_tokenizer(lm_dirs["gpt2"])
    missing = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1 plus 1 is", "answer": "2"}])
    with pytest.raises(DatasetSchemaError, match=r"missing column 'completion'.*\['answer', 'prompt'\]"):
        read_text(missing, tokenizer, "train")
    stray = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "1 plus 1 is", "completion": "2", "choices": ["3", "4"]}])
    with pytest.raises(DatasetSchemaError, match=r"row 0: completion '2' is not among its choices \['3', '4'\]"):
        read_text(stray, tokenizer, "test")
    empty = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "", "completion": "2"}])
    with pytest.raises(DatasetSchemaError, match="row 0: its prompt tokenises to nothing"):
        read_text(empty, tokenizer, "train")


# ---- scores and accuracy -------------------------------------------------------------------------------
def test_choice_accuracy_is_the_lowest_loss_choice_and_greedy_match_is_argmax(lm_dirs, text_files):
    model = create_model(f"hf:{lm_dirs['gpt2']}", 10, 8, 0)
    _, test = load_datasets(DataConfig(dataset=text_files), model)
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    # Each choice on its own, as a one-candidate sample: its loss is minus its score.
    alone = torch.stack([model(x[:, c : c + 1])[:, 0] for c in range(x.shape[1])], 1)
    torch.testing.assert_close(model(x), alone)
    assert torch.equal(model.accuracy(x, y), alone.argmax(1) == y)
    one = x[:, :1]
    logits = model.lm(input_ids=one[:, 0, 0]).logits
    scored = one[:, 0, 1, 1:] == 2
    greedy = ((logits[:, :-1].argmax(-1) == one[:, 0, 0, 1:]) | ~scored).all(1)
    assert torch.equal(model.accuracy(one, torch.zeros(len(one), dtype=torch.long)), greedy)


# ---- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("estimator", ["lr", "spsa", "backprop"])
def test_trains_in_process(lm_dirs, text_files, kind, estimator):
    cfg = _config(lm_dirs[kind], text_files, "lr" if estimator == "backprop" else estimator, batch_size=8, steps=3)
    cfg = cfg.replace(eval_every=0, backprop=estimator == "backprop")
    with build(cfg) as trainer:
        assert [g.name for g in trainer.cfg.groups] == ["mlp", "attn"]
        before = trainer.get_params().copy()
        reports = trainer.fit()
        assert all(np.isfinite(r.loss) for r in reports)
        assert not np.array_equal(trainer.get_params(), before)


def test_bfloat16_forwards_train(lm_dirs, text_files):
    est = EstimatorConfig(kind="lr", precision="bfloat16")
    cfg = _config(lm_dirs["llama"], text_files, batch_size=8, steps=1).replace(estimator=est)
    with build(cfg) as trainer:
        before = trainer.get_params().copy()
        assert np.isfinite(trainer.step().loss)
        assert not np.array_equal(trainer.get_params(), before)


# ---- the estimates -------------------------------------------------------------------------------------
def _engine(lm_dir: str, kind: str, modules: tuple[str, ...], x: np.ndarray, y: np.ndarray, sigma: float = 1e-3):
    model = create_model(f"hf:{lm_dir}", 10, 8, 0).double()
    est = EstimatorConfig(kind=kind, max_rows=128)
    engine = QueryEngine(model, (GroupConfig("g", modules, sigma, 2),), est, root_seed=7, loss_fn=completion_loss)
    engine.set_batch(0, x, y)
    return engine


def _task(index: int, q0: int, q1: int, baseline: float, per: int) -> ShardTask:
    item = ShardItem(0, 11, q0, q1, baseline)
    return ShardTask(kind=TaskKind.MAIN, step=0, group=0, index=index, items=(item,), weights=(1.0 / per,))


@pytest.mark.parametrize("estimator", ["lr", "spsa"])
def test_estimates_are_unbiased_against_backprop(lm_dirs, text_files, estimator):
    """z-scores of K = 40 independent block means (200 queries each) against the exact gradient, as in
    ``test_estimators.py``: on 256 fixed coordinates ``mean z^2`` is ``(K-1)/(K-3) = 1.05`` in expectation with
    spread ``sqrt(2 sum R^2) / n`` (``R`` their correlation, measured from the same blocks), 4 sd allowed; along
    the exact gradient's direction one more t-statistic, ``|t| < 4.5``. Float64 and sigma = 1e-3 keep the
    smoothing bias ~1e-6 of the gradient, far below the standard errors."""
    model_dir = lm_dirs["gpt2"]
    train = read_text(text_files, load_tokenizer(model_dir), "train")
    x, y = train.x[:2], train.y[:2]
    engine = _engine(model_dir, estimator, ("lm.transformer.h.1.attn.c_proj",), x, y)
    params = [p for _, p in engine.groups[0].params]
    with torch.enable_grad():
        loss = completion_loss(engine.model(torch.from_numpy(x[:1])), torch.from_numpy(y[:1])).sum()
        exact = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    blocks, per = 40, 200
    means = torch.stack(
        [torch.from_numpy(engine.run(_task(k, k * per, (k + 1) * per, loss.item(), per)).grad) for k in range(blocks)]
    ).double()
    coords = torch.randperm(len(exact), generator=torch.Generator().manual_seed(0))[:256]
    sub, true = means[:, coords], exact[coords]
    se = sub.std(0) / blocks**0.5
    z2 = ((sub.mean(0) - true) / se) ** 2
    sd = (2 * (torch.corrcoef(sub.T) ** 2).sum()).sqrt().item() / len(true) * 1.05
    assert abs(z2.mean().item() - 1.05) < 4 * sd, f"mean z^2 = {z2.mean().item():.3f}, sd {sd:.3f}"
    along = means @ (exact / exact.norm())
    t = (along.mean() - exact.norm()) / (along.std() / blocks**0.5)
    assert abs(t.item()) < 4.5, f"along the gradient: t = {t.item():.2f}"


@pytest.mark.parametrize("estimator", ["lr", "spsa"])
@pytest.mark.parametrize("kind", KINDS)
def test_pad_tokens_change_nothing(lm_dirs, text_files, kind, estimator):
    """The same samples with 5 more pad tokens: the same clean losses, perturbed losses and estimates (a group of
    two linears, so LR's token-by-token noise layout is exercised too).

    In float64 they agree bit for bit here; the bound, 1e-12 of the largest value, leaves room for matmul kernels
    that round by matrix shape (float64 rounding is 1.1e-16). A pad token in LR's terms, or noise that moves with
    the padding, changes them by order 1."""
    train = read_text(text_files, load_tokenizer(lm_dirs[kind]), "train")
    x, y = train.x[:4], train.y[:4]
    padded = np.concatenate([x, np.zeros((*x.shape[:3], 5), dtype=x.dtype)], -1)
    mlp = ("lm.transformer.h.1.mlp.*",) if kind == "gpt2" else ("lm.model.layers.1.mlp.*",)
    results = []
    for inputs in (x, padded):
        engine = _engine(lm_dirs[kind], estimator, mlp, inputs, y, sigma=0.05)
        clean = engine.run(ShardTask(kind=TaskKind.CLEAN, step=0, group=0, index=0, items=(_item(0),)))
        results.append((clean.losses, engine.run(_task(1, 0, 8, float(clean.losses[0]), 8))))
    (clean_a, a), (clean_b, b) = results
    for got, want in ((clean_b, clean_a), (b.losses, a.losses), (b.grad, a.grad)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    assert np.abs(a.grad).max() > 0


def _item(pos: int) -> ShardItem:
    return ShardItem(pos, pos, 0, 1, 0.0)


def test_a_chunk_gives_the_same_estimate_whatever_ran_before_it(lm_dirs, text_files):
    """The shared prefix is checked on a replica's first chunk with more rows than samples, a one-sample chunk
    beside a second sample. A chunk's estimate must not depend on whether it was that chunk (a batch of one sample
    rounds otherwise than a batch of two): replicas that ran other chunks first give the in-process bits."""
    model_dir = lm_dirs["gpt2"]
    train = read_text(text_files, load_tokenizer(model_dir), "train")
    x, y = train.x[:4], train.y[:4]
    one = ShardTask(TaskKind.MAIN, 0, 0, 0, (ShardItem(0, 0, 0, 16, 4.0),), (1 / 16,))
    pair = ShardTask(TaskKind.MAIN, 0, 0, 1, (ShardItem(1, 1, 0, 2, 4.0),), (1 / 2,))
    two = ShardTask(TaskKind.MAIN, 0, 0, 2, (ShardItem(2, 2, 0, 8, 4.0), ShardItem(3, 3, 0, 8, 4.0)), (1 / 8, 1 / 8))
    orders = [(one, pair, two), (two, pair, one), (pair, two, one)]
    runs = []
    for order in orders:
        engine = QueryEngine(
            create_model(f"hf:{model_dir}", 10, 8, 0),
            (GroupConfig("g", ("lm.transformer.h.1.mlp.c_proj",), 0.05, 2),),
            EstimatorConfig(kind="lr"),
            root_seed=7,
            loss_fn=completion_loss,
        )
        engine.set_batch(0, x, y)
        runs.append({task.index: engine.run(task) for task in order})
    for run in runs[1:]:
        for index, result in run.items():
            want = runs[0][index]
            assert np.array_equal(result.losses, want.losses) and np.array_equal(result.grad, want.grad)


def test_a_run_checkpoints_its_groups_and_resumes(lm_dirs, text_files, tmp_path):
    """``train`` writes the groups it trained into the summary and the checkpoint; ``--resume`` from a config that
    still names the defaults continues the run."""
    from flops_ray.app.run import evaluate, train
    from flops_ray.config import JobConfig

    cfg = _config(lm_dirs["llama"], text_files, batch_size=8, steps=2, eval_every=0)
    summary = train(cfg, tmp_path, JobConfig(log_every=1))
    assert [g["name"] for g in summary["config"]["groups"]] == ["mlp", "attn"]
    assert summary["test_size"] == 12
    assert summary["accuracy"] == evaluate(tmp_path / "checkpoint.safetensors")["test_accuracy"]
    resumed = train(cfg.replace(steps=3), tmp_path, JobConfig(log_every=1), resume=True)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 3


def test_resolved_config_holds_the_lm_groups(lm_dirs, text_files):
    cfg = _config(lm_dirs["llama"], text_files)
    resolved, loss_fn = fit_to_model(cfg, create_model(cfg.model, 10, 8, 0))
    assert loss_fn is completion_loss and resolved.groups != cfg.groups
    assert dataclasses.replace(resolved, groups=cfg.groups) == cfg


# ---- the farm and the command --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize(("estimator", "reduction"), [("lr", "driver"), ("spsa", "driver")])
def test_farm_equals_in_process_bit_for_bit(lm_dirs, text_files, estimator, reduction):
    """Two replicas on a real local Ray give the in-process parameters after every step, bit for bit."""
    from flops_ray.config import FarmConfig

    cfg = _config(lm_dirs["gpt2"], text_files, estimator, batch_size=8, steps=2, eval_every=0)

    def params_per_step(backend: str) -> list[np.ndarray]:
        farm = FarmConfig(backend=backend, replicas=2, reduction=reduction, shard_cost=16, num_cpus_per_replica=1)
        with build(cfg.replace(farm=farm)) as trainer:
            return [(trainer.step(), trainer.get_params().copy())[1] for _ in range(cfg.steps)]

    # The in-process step computes on a 1-CPU replica's one thread (farm.local_threads=0), as the replicas do.
    local = params_per_step("local")
    farm = params_per_step("ray")
    assert not np.array_equal(local[0], local[-1])
    for step, (a, b) in enumerate(zip(local, farm)):
        assert np.array_equal(a, b), f"step {step}: max diff {np.abs(a - b).max():.3g}"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")  # the default config runs on a local Ray the command starts
def test_flops_ray_train_on_a_jsonl_file(lm_dirs, text_files, tmp_path):
    import shutil
    import subprocess
    import sys

    from flops_ray.app.run import evaluate

    script = shutil.which("flops-ray", path=str(Path(sys.executable).parent))
    out = tmp_path / "run"
    sets = [f"model=hf:{lm_dirs['llama']}", f"data.dataset={text_files}", "steps=2"]
    command = [script] if script else [sys.executable, "-m", "flops_ray.app.cli"]
    proc = subprocess.run(
        [*command, "train", "--quick", "--out", str(out), *(a for s in sets for a in ("--set", s))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[:4] == ["initial_accuracy", "accuracy", "initial_loss", "loss"]
    # The untrained model's accuracy on the test choices, computed here: the run's starting point.
    model = create_model(f"hf:{lm_dirs['llama']}", 10, 8, 0)
    _, test = load_datasets(DataConfig(dataset=text_files), model)
    right = model.accuracy(torch.from_numpy(test.x), torch.from_numpy(test.y))
    assert summary["initial_accuracy"] == int(right.sum()) / len(test)
    assert all(np.isfinite(summary[k]) for k in ("initial_loss", "loss"))
    assert summary["config"]["farm"]["backend"] == "ray" and summary["test_size"] == 12
    # The run's config holds the groups it trained, so the checkpoint evaluates (and resumes) as it ran.
    assert [g["name"] for g in summary["config"]["groups"]] == ["mlp", "attn"]
    assert evaluate(out / "checkpoint.safetensors")["test_accuracy"] == summary["accuracy"]
