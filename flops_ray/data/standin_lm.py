"""The embedded default for text: a stand-in pretrained causal LM and a task it cannot do zero-shot, made locally.

No hub is reachable, so :func:`make_standin` makes what one would give: a word-level tokenizer and a small
GPT-2 pretrained by backprop on :mod:`~flops_ray.data.standin_text`'s reviews, both saved with
``save_pretrained`` in one folder that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load as they would a hub model's, and the topic task as JSONL in MeZO's
prompt style (``{"prompt": "i ate a ripe plum . it was", "completion": " great", "choices": [" great",
" terrible"]}``). Everything derives from the root seed: the same seed writes the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flops_ray.data.standin_text import pretraining_sentence, task_splits, vocabulary
from flops_ray.files import atomic_path
from flops_ray.seeding import STREAM_DATA, STREAM_INIT, derive_seed

_STANDIN = 0x5354
"""Counter that keeps the stand-in's draws apart from other users of the same streams."""
WARMUP_STEPS = 50
"""Pretraining steps of learning-rate warm-up."""
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
"""The tokenizer's special tokens (no BOS: a prompt's ids are its words' ids, nothing added)."""


@dataclass(frozen=True)
class StandinSettings:
    """Sizes of the stand-in's task, model and pretraining."""

    train_size: int = 1000
    """Task rows in ``train.jsonl``, half per label."""
    test_size: int = 400
    """Task rows in ``test.jsonl``, half per label, no prompt shared with ``train.jsonl``."""
    pretrain_sentences: int = 4000
    """Sentences of pretraining text (held in memory, not written)."""
    pretrain_steps: int = 400
    """Backprop steps of pretraining: enough for the model to carry the topic to the end of a review."""
    batch_size: int = 64
    """Sentences per pretraining step."""
    lr: float = 1e-2
    """AdamW's peak learning rate: reached linearly in :data:`WARMUP_STEPS`, then decayed linearly to zero."""
    width: int = 64
    """GPT-2's ``n_embd``."""
    layers: int = 2
    """GPT-2's ``n_layer``."""
    heads: int = 4
    """GPT-2's ``n_head``."""


@dataclass(frozen=True)
class StandinPaths:
    """Where :func:`make_standin` writes."""

    root: Path
    """The folder given."""
    model: Path
    """``root/model``: the model and its tokenizer, for ``from_pretrained``."""
    train: Path
    """``root/train.jsonl``."""
    test: Path
    """``root/test.jsonl``."""

    @classmethod
    def under(cls, root: str | Path) -> StandinPaths:
        """The paths in ``root``."""
        root = Path(root)
        return cls(root, root / "model", root / "train.jsonl", root / "test.jsonl")


def word_tokenizer(words: tuple[str, ...]):
    """A ``PreTrainedTokenizerFast`` with one id per word (after :data:`SPECIAL_TOKENS`), splitting on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *words])}
    tokenizer = Tokenizer(models.WordLevel(ids, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=32, **SPECIAL_TOKENS)


def _encode(tokenizer, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentences as right-padded ids ``(N, T)``, each ending with EOS, and their attention mask."""
    rows = [tokenizer(s)["input_ids"] + [tokenizer.eos_token_id] for s in sentences]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: a CPU reduction's order, hence trained weights' last bits, can depend on the thread
    count, and a stand-in must be the same bytes on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _encode_summaries(tokenizer, summaries: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summary words as ids ``(N, M)`` and weights ``(N, M)`` (1 for a word, 0 for padding)."""
    rows = [tokenizer.convert_tokens_to_ids(words) for words in summaries]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    weights = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in rows])
    return ids, weights


def pretrain(
    tokenizer, sentences: list[str], settings: StandinSettings, seed: int, summaries: list[list[str]] | None = None
):
    """A ``GPT2LMHeadModel`` trained by backprop on ``sentences`` (next-token cross-entropy), in eval mode.

    With ``summaries`` (words per sentence), each sentence is read after one extra first position holding the sum
    of its summary words' input embeddings, and its first token is predicted from there: the model learns to read
    a single embedding that says what follows, as it will read a vision adapter's visual token.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    ids, mask = _encode(tokenizer, sentences)
    if summaries is None:
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    else:
        targets = ids.masked_fill(mask == 0, -100)  # the summary position predicts the first token
        words, weights = _encode_summaries(tokenizer, summaries)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=tokenizer.model_max_length,
        n_embd=settings.width,
        n_layer=settings.layers,
        n_head=settings.heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, STREAM_INIT, _STANDIN))
        model = GPT2LMHeadModel(config)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
        steps = settings.pretrain_steps
        # Decayed to zero: the weights saved are where the noise of the last steps has settled.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / WARMUP_STEPS, (steps - s) / max(steps - WARMUP_STEPS, 1))
        )
        gen = torch.Generator().manual_seed(derive_seed(seed, STREAM_DATA, _STANDIN, 2))
        for _ in range(steps):
            idx = torch.randint(len(ids), (settings.batch_size,), generator=gen)
            if summaries is None:
                logits = model(input_ids=ids[idx], attention_mask=mask[idx]).logits[:, :-1]
            else:
                embed = model.get_input_embeddings()
                first = (embed(words[idx]) * weights[idx, :, None]).sum(1, keepdim=True)  # (b, 1, E)
                seq = torch.cat([first, embed(ids[idx])], 1)
                ones = torch.ones_like(mask[idx, :1])
                logits = model(inputs_embeds=seq, attention_mask=torch.cat([ones, mask[idx]], 1)).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[idx].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_standin(out_dir: str | Path, seed: int, settings: StandinSettings = StandinSettings()) -> StandinPaths:
    """Write the stand-in under ``out_dir``: ``model/`` (GPT-2 and tokenizer), ``train.jsonl``, ``test.jsonl``.

    The pretraining text and the task come from separate draws of ``seed``; the model's initial weights
    and batch order from others. Returns the paths written.
    """
    paths = StandinPaths.under(out_dir)
    text_rng = random.Random(derive_seed(seed, STREAM_DATA, _STANDIN, 0))
    sentences = [pretraining_sentence(text_rng) for _ in range(settings.pretrain_sentences)]
    tokenizer = word_tokenizer(vocabulary())
    model = pretrain(tokenizer, sentences, settings, seed)
    model.save_pretrained(paths.model)
    tokenizer.save_pretrained(paths.model)
    train, test = task_splits(
        random.Random(derive_seed(seed, STREAM_DATA, _STANDIN, 1)), settings.train_size, settings.test_size
    )
    _write_jsonl(paths.train, train)
    _write_jsonl(paths.test, test)
    return paths
