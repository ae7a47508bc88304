"""The shared prefix of a chunk's perturbed forwards: the blocks before the group run once per sample.

A query perturbs only its group, so every block the model runs before the group's first one computes the
same activations for all queries of a sample. A chunk runs those blocks on its distinct samples and expands
their output (and any per-sample tensor passed beside it, such as an attention mask) to its rows at the
*cut*: the element of a sequential stack (``nn.Sequential`` or ``nn.ModuleList``) that holds the group's
first module, else the model's child holding it (a head). A query
then costs the forward from the cut on plus its share of the prefix, less than a plain forward when the group
sits high in the model (the ViT configs' ``top`` groups).

Whether a model allows the cut is checked, not assumed: the first chunk also runs every row through the
whole model and the shared outputs must match (a skip connection around the cut, or a module mixing rows,
would make them fail or differ); otherwise the estimator keeps running rows through the whole model. A chunk
of one sample is checked with a second sample of the batch beside it, so a model whose chunks all hold one
sample (a sample's queries filling whole chunks) still shares. The check needs more rows than samples (only
then does a tensor from before the cut fail to meet the fanned-out rows): until a chunk has them, and for
chunks of one query per sample, rows run the whole model.

>>> from flops_ray.models.groups import resolve_groups
>>> from flops_ray.config import GroupConfig
>>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> group = resolve_groups(model, (GroupConfig("top", ("2",), sigma=0.1, queries_per_sample=2),), linear_outputs=True)[0]
>>> find_cut(model, group)
'2'
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

from flops_ray.config import EstimatorConfig
from flops_ray.models.groups import ResolvedGroup

_STACKS = (nn.Sequential, nn.ModuleList)


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    """Whether ``a`` and ``b`` agree within ``tolerance`` of ``b``'s largest magnitude (non-finite where equal)."""
    if not torch.equal(a.isfinite(), b.isfinite()):
        return False
    fin = b.isfinite()
    return bool(((a - b)[fin].abs().max() <= tolerance * b[fin].abs().max()).item()) if fin.any() else True


class _CutMismatch(Exception):
    """The cut block's input is not the prefix's output of the chunk's distinct samples."""


def find_cut(model: nn.Module, group: ResolvedGroup) -> str | None:
    """Where the group's first-registered parameter starts: the outermost stack element holding it, else the
    model's child holding it (a head); ``None`` for a parameter of the model itself."""
    first = group.params[0][0].split(".")[:-1]
    for depth in range(1, len(first) + 1):
        if isinstance(model.get_submodule(".".join(first[: depth - 1])), _STACKS):
            return ".".join(first[:depth])
    return first[0] if first else None


class SharedPrefix:
    """Runs a chunk's rows with the prefix shared per sample, once the first chunk has shown the cut is exact.

    Args:
        model: the replica's model.
        group: the perturbed group.
        cfg: estimator settings: ``share_prefix`` (False: every row runs the whole model) and the forwards'
            ``precision`` (how far a batch of other rows may move the outputs).
    """

    def __init__(self, model: nn.Module, group: ResolvedGroup, cfg: EstimatorConfig):
        self.model = model
        self.cut = find_cut(model, group) if cfg.share_prefix else None
        """The stack element where rows fan out from samples; ``None``: no sharing."""
        self.tolerance = 1e-3 if cfg.precision == "float32" else 5e-2
        """Largest difference of shared and whole-model outputs on the first chunk, relative to their largest
        output: batch-shape dependent rounding passes, a wrong fan-out (outputs of other samples) does not."""
        self._checked = False

    def run(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, first: torch.Tensor, fan: torch.Tensor
    ) -> torch.Tensor:
        """Outputs of the rows ``x[first][fan]``.

        Args:
            forward: runs the model (with the chunk's perturbation in place) on inputs, returning outputs.
            x: ``(B, ...)`` the step's batch.
            first: ``(u,)`` batch rows of the chunk's distinct samples.
            fan: ``(r,)`` each row's index into ``first``.
        """
        if self.cut is None or len(first) == len(fan):
            return forward(x[first[fan]])  # nothing to share
        # A chunk of one sample is checked beside a second sample of the batch that no row fans out from: alone,
        # its single-row tensors would broadcast past a skip connection and pass.
        probe = first if len(first) > 1 or len(x) == 1 else torch.cat([first, (first + 1) % len(x)])
        if len(probe) == 1 or len(fan) <= len(probe):
            # Too few to check the cut on: only with two samples or more, and more rows than samples, does a
            # tensor from before the cut fail to meet the fanned-out rows, whatever the tolerance. Such a chunk
            # runs the whole model before and after the check alike, so its losses never depend on which chunks
            # its replica ran before.
            return forward(x[first[fan]])
        if self._checked:
            try:
                return self._shared(forward, x[first], fan)
            except _CutMismatch:  # a prefix that behaves otherwise at this many samples
                return self._give_up(forward, x[first[fan]])
        full = forward(x[first[fan]])
        self._checked = True
        try:
            shared = self._shared(forward, x[probe], fan)
            exact = shared.shape == full.shape and _close(shared, full, self.tolerance)
        except Exception:  # any failure of the shared run means the cut is not exact
            exact = False
        if not exact:
            return self._give_up(forward, x[first[fan]])
        if len(probe) == len(first):
            return shared  # run last, so what the forward captured (LR's inputs and noise) is the shared run's
        # A probe with a second sample is run again without it, as every later chunk runs (a batch's rounding
        # depends on its size).
        try:
            return self._shared(forward, x[first], fan)
        except _CutMismatch:
            return self._give_up(forward, x[first[fan]])

    def _give_up(self, forward: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Warn, stop sharing for good, and run ``rows`` through the whole model."""
        warnings.warn(
            f"the blocks before {self.cut!r} cannot be shared between a sample's queries (outputs differ or fail "
            "when rows fan out there): every query runs the whole model",
            stacklevel=3,
        )
        self.cut = None
        return forward(rows)

    def _shared(self, forward: Callable[[torch.Tensor], torch.Tensor], xs: torch.Tensor, fan: torch.Tensor):
        def per_row(a: object) -> object:
            return a[fan] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == len(xs) else a

        def fan_out(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != len(xs):
                raise _CutMismatch
            # Per-sample tensors passed beside the input (a transformer block's attention mask) fan out with it.
            return (args[0][fan], *map(per_row, args[1:])), {k: per_row(v) for k, v in kwargs.items()}

        # Registered per call: the estimator may have swapped the cut block for a per-row stand-in.
        handle = self.model.get_submodule(self.cut).register_forward_pre_hook(fan_out, with_kwargs=True)
        # A model that reads its input again after the blocks (a causal LM scores the completion's tokens) is told
        # each output row's sample.
        fanned = getattr(self.model, "fanned_out", None)
        try:
            with fanned(fan) if fanned is not None else contextlib.nullcontext():
                return forward(xs)
        finally:
            handle.remove()
