"""A causal language model as a scorer of candidate completions: one int64 tensor in, one score per candidate out.

The input ``x (B, C, 2, T)`` holds, for each of ``C`` candidate completions of a sample, row 0: the token ids of
prompt + completion right-padded to ``T``; row 1: each token's role (:data:`PAD`, :data:`PROMPT`,
:data:`COMPLETION`). A candidate's score is minus the mean cross entropy of its completion tokens given everything
before them, so ``completion_loss(scores, y)`` is the true completion's loss and ``argmax(scores)`` the choice of
the lowest loss. Right padding with causal attention leaves every real token's logits as they are: no real token
sees a pad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

PAD, PROMPT, COMPLETION = 0, 1, 2
"""Token roles (row 1 of an input)."""


def completion_targets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, T-1)`` the next token at each position of the ``(B*C, T)`` flattened candidates of ``x (B, C, 2, T)``,
    and whether it is a completion token to score."""
    ids, role = x.flatten(0, 1).unbind(1)
    return ids[:, 1:], role[:, 1:] == COMPLETION


def completion_scores(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` minus the mean cross entropy of each candidate's completion tokens under ``logits (B*C, T, V)``
    (``-inf`` for a candidate with none: a padding candidate of a sample with fewer choices, never chosen)."""
    targets, scored = completion_targets(x)
    pred = logits[:, :-1].float()  # position t predicts token t + 1
    ce = nn.functional.cross_entropy(pred.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    count = scored.sum(1)
    mean = torch.where(scored, ce, 0.0).sum(1) / count.clamp(min=1)
    return torch.where(count > 0, -mean, float("-inf")).view(x.shape[:2])


class LMFeatures(NamedTuple):
    """What :meth:`CausalLMScorer.forward_features` returns: the scores and a per-sample embedding."""

    scores: torch.Tensor
    """``(B, C)`` each candidate's score."""
    embedding: torch.Tensor
    """``(B, D)`` the last hidden state averaged over the sample's real tokens (the Gaussian allocator's kernel)."""


class FannedRows:
    """For a model that reads its input again after the blocks a shared prefix (:mod:`flops_ray.estimators.prefix`)
    fans out: while :meth:`fanned_out` holds, output row ``r`` is input sample ``fan[r]``."""

    _fan: torch.Tensor | None = None

    @contextlib.contextmanager
    def fanned_out(self, fan: torch.Tensor) -> Iterator[None]:
        """Output row ``r`` is sample ``fan[r]`` until the block ends."""
        self._fan = fan
        try:
            yield
        finally:
            self._fan = None

    def per_row(self, t: torch.Tensor) -> torch.Tensor:
        """A per-sample tensor ``(B, ...)`` as one row per output row (itself unless fanned out)."""
        return t if self._fan is None else t[self._fan]


class CausalLMScorer(FannedRows, nn.Module):
    """Wraps a Hugging Face causal LM (``lm``, any module whose call takes ``input_ids`` and ``attention_mask`` and
    returns ``.logits``) as a model of ``x (B, C, 2, T) -> scores (B, C)``.

    It holds no tokenizer (replicas get the module through the object store and never tokenise): ``source`` names
    where the tokenizer lives, for the driver.

    Args:
        lm: the causal LM.
        source: the repository id or directory it was loaded from.
        eval_rows: candidate sequences per forward in :meth:`accuracy` (bounds the ``(rows, T, vocab)`` logits).
    """

    def __init__(self, lm: nn.Module, source: str = "", eval_rows: int = 64):
        super().__init__()
        self.lm = lm
        self.source = source
        self.eval_rows = eval_rows

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, V)`` the LM's logits of the ``(B*C, T)`` flattened candidates, pads masked out of attention."""
        ids, role = x.flatten(0, 1).unbind(1)  # (N, T) each
        return self.lm(input_ids=ids, attention_mask=(role > 0).long(), use_cache=False).logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, 2, T)`` int64 -> ``(B, C)`` scores (one row per output row of the LM, see :meth:`fanned_out`)."""
        logits = self._logits(x)
        return completion_scores(self.per_row(x), logits)

    def forward_features(self, x: torch.Tensor) -> LMFeatures:
        """Scores and embeddings in one pass (the clean pass reads both, as it does a timm model's)."""
        # The output head's input is the last hidden state. A hook reads it: transformers' own recording of
        # hidden states is set up when a model is built, which a replica that unpickled it never did.
        captured: list[torch.Tensor] = []
        head = self.lm.get_output_embeddings()
        handle = head.register_forward_hook(lambda module, args, out: captured.append(args[0]))
        try:
            scores = completion_scores(x, self._logits(x))
        finally:
            handle.remove()
        real = (x[:, :, 1] > 0).flatten(0, 1)[..., None].to(captured[-1].dtype)  # (N, T, 1)
        pooled = (captured[-1] * real).sum(1) / real.sum(1).clamp(min=1)  # (N, D)
        return LMFeatures(scores, pooled.view(*x.shape[:2], -1).mean(1).float())

    @staticmethod
    def forward_head(features: LMFeatures, pre_logits: bool = False) -> torch.Tensor:
        """The scores, or (``pre_logits``) the embedding, of :meth:`forward_features`."""
        return features.embedding if pre_logits else features.scores

    @staticmethod
    def token_mask(x: torch.Tensor) -> torch.Tensor:
        """``(B, C*T)`` whether each token is real (not a pad): LR leaves pad tokens out of its terms."""
        return (x[:, :, 1] > 0).flatten(1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(B,)`` whether each sample is right: with several candidates, the true one (``y``) scores highest;
        with one, greedy decoding reproduces it (the argmax of every completion position is its next token)."""
        rows = max(1, self.eval_rows // x.shape[1])
        return torch.cat([self._correct(x[s : s + rows], y[s : s + rows]) for s in range(0, len(x), rows)])

    def _correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x)
        if x.shape[1] > 1:
            return completion_scores(x, logits).argmax(-1) == y
        targets, scored = completion_targets(x)
        return ((logits[:, :-1].argmax(-1) == targets) | ~scored).all(1)
