"""Prompt-completion text datasets (JSONL or Parquet), tokenised once into the candidate rows a causal LM scores.

A file has a string column ``prompt``, a string column ``completion`` and optionally ``choices``, a list of
strings one of which is the completion. A sample becomes ``x (C, 2, T)`` int64 (row 0: the prompt's tokens
then a candidate's, right-padded; row 1: each token's role, 0 pad, 1 prompt, 2 completion) and a target ``y``,
the index of the true candidate (:class:`~flops_ray.models.causal_lm.CausalLMScorer` reads them). A training
split has one candidate, the completion (``C = 1``, ``y = 0``); a test split with ``choices`` has them all
(``C`` = the most choices of a sample; a sample with fewer gets empty candidates, which never win). The
completion is tokenised on its own and appended to the prompt's tokens (write its leading space if the
tokenizer expects one); ``T`` is the longest sequence of the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flops_ray.data.arrays import ArrayDataset
from flops_ray.data.parquet import DatasetSchemaError

COLUMNS = ("prompt", "completion")
"""The columns every text dataset has; ``choices`` is optional."""


class Tokenizer(Protocol):
    """What is asked of a tokenizer: a Hugging Face tokenizer's call on a list of strings, and its special ids."""

    pad_token_id: int | None
    eos_token_id: int | None

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> Any: ...


def is_text_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a text dataset: a ``.jsonl`` file, or Parquet with a ``prompt`` column."""
    path = Path(path).expanduser()
    if path.suffix == ".jsonl":
        return True
    if not path.is_file():
        return False
    import pyarrow.parquet as pq

    return "prompt" in pq.read_schema(path).names


def read_rows(path: str | Path, limit: int = 0) -> list[dict[str, Any]]:
    """The rows of a JSONL or Parquet text file (the first ``limit``; 0: all), checked column by column.

    Raises:
        DatasetSchemaError: a missing column, a row that is not JSON, a prompt or completion that is not a string,
            choices that are not a list of strings, or a completion that is not among its choices (row named).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetSchemaError(f"{path}: line {number} is not JSON ({exc})") from exc
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    rows = rows[:limit] if limit else rows
    if not rows:
        raise DatasetSchemaError(f"{path}: no rows")
    names = sorted({k for row in rows[:1] if isinstance(row, dict) for k in row})
    for column in COLUMNS:
        if not all(isinstance(row, dict) and column in row for row in rows):
            raise DatasetSchemaError(f"{path}: missing column {column!r} (text dataset); the file has columns {names}")
    for i, row in enumerate(rows):
        _check_row(row, f"{path}: row {i}")
    return rows


def _check_row(row: dict[str, Any], where: str) -> None:
    for column in COLUMNS:
        if not isinstance(row[column], str):
            raise DatasetSchemaError(f"{where}: {column} is {row[column]!r}, expected a string")
    choices = row.get("choices")
    if choices is None:
        return
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DatasetSchemaError(f"{where}: choices must be a list of strings, got {choices!r}")
    if row["completion"] not in choices:
        raise DatasetSchemaError(f"{where}: completion {row['completion']!r} is not among its choices {choices}")


def pad_id(tokenizer: Tokenizer) -> int:
    """The id that pads a tokenizer's sequences: its pad token, else its end-of-sequence token, else 0."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def tokenise(rows: list[dict[str, Any]], tokenizer: Tokenizer, with_choices: bool, where: str = "") -> ArrayDataset:
    """``rows`` as candidate rows ``x (N, C, 2, T)`` int64 and targets ``y (N,)`` (see the module docstring).

    Args:
        rows: checked rows (:func:`read_rows`).
        tokenizer: the model's tokenizer; its pad token pads (else its end-of-sequence token, else 0).
        with_choices: every sample's candidates are its ``choices`` (a test split), else its completion only.
        where: names the file in errors.

    Raises:
        DatasetSchemaError: a prompt or a completion that tokenises to nothing (a completion's first token is
            scored given the tokens before it).
    """
    candidates = [row["choices"] if with_choices and row.get("choices") else [row["completion"]] for row in rows]
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=True)["input_ids"]
    flat = [text for texts in candidates for text in texts]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])
    tokens = [[next(encoded) for _ in texts] for texts in candidates]
    for i, (prompt, cands) in enumerate(zip(prompts, tokens)):
        if not prompt or not all(cands):
            part = "prompt" if not prompt else "completion" if not with_choices else "a choice"
            raise DatasetSchemaError(f"{where}row {i}: its {part} tokenises to nothing")
    width = max(len(texts) for texts in candidates)
    length = max(len(p) + len(c) for p, cands in zip(prompts, tokens) for c in cands)
    pad = pad_id(tokenizer)
    x = np.zeros((len(rows), width, 2, length), dtype=np.int64)
    x[:, :, 0] = pad
    for i, (prompt, cands) in enumerate(zip(prompts, tokens)):
        for c, completion in enumerate(cands):
            x[i, c, 0, : len(prompt) + len(completion)] = prompt + completion
            x[i, c, 1, : len(prompt)] = 1
            x[i, c, 1, len(prompt) : len(prompt) + len(completion)] = 2
    y = [texts.index(row["completion"]) for row, texts in zip(rows, candidates)]
    return ArrayDataset(x, np.asarray(y, dtype=np.int64))


def read_text(path: str | Path, tokenizer: Tokenizer, split: str, limit: int = 0) -> ArrayDataset:
    """A text dataset file tokenised for a causal LM: ``split`` ``train`` gives one candidate per sample (the
    completion), ``test`` every choice where the file has them (choice accuracy), else the completion (greedy
    exact match)."""
    rows = read_rows(path, limit)
    return tokenise(rows, tokenizer, with_choices=split == "test" and "choices" in rows[0], where=f"{path}: ")
