"""The stand-in causal LM: its files load like a hub model's, the same seed writes the same bytes, it cannot do
its task zero-shot, and backprop on its last MLP output projection alone learns the task."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flops_ray.data.standin_lm import StandinSettings, make_standin  # noqa: E402
from flops_ray.data.standin_text import TOPICS, VERDICTS, pretraining_sentence, vocabulary  # noqa: E402

TINY = StandinSettings(train_size=40, test_size=20, pretrain_sentences=200, pretrain_steps=3, batch_size=8)
"""A stand-in made in about a second: for what does not need a trained model."""


def _load(paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(paths.model).eval(), AutoTokenizer.from_pretrained(paths.model)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _completion_losses(model, tokenizer, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """Mean cross-entropy of each completion's tokens given its prompt, ``(N,)``."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    seqs = [p + tokenizer(c)["input_ids"] for p, c in zip(prompt_ids, completions)]
    ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_token_id)
    scored = torch.zeros(ids.shape, dtype=torch.bool)  # position t scores token t + 1
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        scored[i, len(p) - 1 : len(s) - 1] = True
    logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = scored[:, :-1].float()
    return (nll * mask).sum(1) / mask.sum(1)


def _choice_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Share of rows whose true completion has the lowest loss among its choices."""
    prompts = [r["prompt"] for r in rows]
    with torch.no_grad():
        losses = torch.stack(
            [_completion_losses(model, tokenizer, prompts, [r["choices"][k] for r in rows]) for k in range(2)], 1
        )
    truth = torch.tensor([r["choices"].index(r["completion"]) for r in rows])
    return (losses.argmin(1) == truth).float().mean().item()


def _tune_top_projection(model, tokenizer, rows: list[dict], steps: int = 100) -> None:
    """Backprop on ``transformer.h[-1].mlp.c_proj`` alone (Adam, batches of 32); every other weight frozen."""
    model.requires_grad_(False)
    top = model.transformer.h[-1].mlp.c_proj.requires_grad_(True)
    opt = torch.optim.Adam(top.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (32,), generator=gen).tolist()]
        loss = _completion_losses(model, tokenizer, [r["prompt"] for r in batch], [r["completion"] for r in batch])
        opt.zero_grad()
        loss.mean().backward()
        opt.step()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_standin(tmp_path_factory.mktemp("tiny"), seed=0, settings=TINY)


def test_files_load_back_like_a_hub_model(tiny):
    model, tokenizer = _load(tiny)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert len(tokenizer) == len(vocabulary()) + 3 == model.config.vocab_size <= 200
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "<eos>", "<unk>")
    prompt = "i ate a ripe plum . it was"
    assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt
    assert tokenizer(" great")["input_ids"] == [tokenizer.convert_tokens_to_ids("great")]
    assert tokenizer("i ate a unicorn")["input_ids"][-1] == tokenizer.unk_token_id
    train, test = _rows(tiny.train), _rows(tiny.test)
    assert (len(train), len(test)) == (TINY.train_size, TINY.test_size)
    for row in train + test:
        assert list(row) == ["prompt", "completion", "choices"]
        assert row["choices"] == [f" {v}" for v in VERDICTS] and row["completion"] in row["choices"]
        assert len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) <= 24
    assert Counter(r["completion"] for r in test) == {" great": 10, " terrible": 10}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_the_same_seed_writes_the_same_bytes(tiny, tmp_path):
    again = make_standin(tmp_path / "again", seed=0, settings=TINY)
    other = make_standin(tmp_path / "other", seed=1, settings=TINY)
    files = sorted(p.relative_to(tiny.root) for p in tiny.root.rglob("*") if p.is_file())
    assert "model/model.safetensors" in {str(f) for f in files}
    for f in files:
        assert (again.root / f).read_bytes() == (tiny.root / f).read_bytes(), f
    assert (other.model / "model.safetensors").read_bytes() != (tiny.model / "model.safetensors").read_bytes()
    assert other.train.read_bytes() != tiny.train.read_bytes()


def test_verdicts_in_pretraining_are_independent_of_the_topic():
    # Counted on the text itself: the verdicts' odds are the same after either topic's reviews.
    rng = random.Random(0)
    counts = Counter()
    for _ in range(20000):
        words = pretraining_sentence(rng).split()
        topic = next(k for k, t in enumerate(TOPICS) if words[1] in t.verbs)
        counts[topic, words[-2]] += 1
    for topic in range(len(TOPICS)):
        great, terrible = counts[topic, VERDICTS[0]], counts[topic, VERDICTS[1]]
        assert great / (great + terrible) == pytest.approx(0.7, abs=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_shot_is_chance_and_tuning_the_top_projection_learns_the_task(seed, tmp_path):
    paths = make_standin(tmp_path, seed)
    model, tokenizer = _load(paths)
    train, test = _rows(paths.train), _rows(paths.test)
    assert _choice_accuracy(model, tokenizer, test) <= 0.6
    _tune_top_projection(model, tokenizer, train)
    assert _choice_accuracy(model, tokenizer, test) >= 0.9
