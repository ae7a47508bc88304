"""The shared prefix: blocks before a group run once per sample, with the estimate of every row through the model."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from flops_ray.config import EstimatorConfig, GroupConfig
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.replica.engine import QueryEngine


class _Block(nn.Module):
    """A residual token MLP, as a transformer block's second half."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Stacked(nn.Module):
    """Embedding, a stack of three blocks, pooled head; ``skip`` adds the embedding back around the stack."""

    def __init__(self, skip: bool = False):
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.blocks = nn.Sequential(*(_Block(6) for _ in range(3)))
        self.head = nn.Linear(6, 3)
        self.skip = skip

    def forward(self, x):
        h = self.embed(x)
        out = self.blocks(h)
        return self.head((out + h if self.skip else out).mean(1))


TOP = ("blocks.2.fc2", "head")


class HeadFirst(nn.Module):
    """A group linear before the cut: ``head`` is registered before ``pre``, so a group of both cuts at ``head``."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.pre = nn.Linear(5, 6)
        self.blocks = nn.Sequential(*(_Block(6) for _ in range(2)))

    def forward(self, x):
        return self.head(self.blocks(self.pre(x)).mean(1))


def _run(
    kind: str,
    share: bool,
    skip: bool = False,
    rows: dict | None = None,
    modules: tuple[str, ...] = TOP,
    max_rows: int = 256,
    samples: int = 3,
    queries: int = 6,
    model: type[nn.Module] = Stacked,
):
    """Losses and gradient sum of one main shard (``samples`` samples, ``queries`` each) of a group of
    ``modules``, in chunks of ``max_rows``; ``rows`` collects the rows each block sees."""
    torch.manual_seed(0)
    net = (Stacked(skip) if model is Stacked else model()).double()
    if rows is not None:

        def seen(name):
            def hook(module, args, out):
                rows[name] = len(args[0])  # the last call: the shard's only chunk (after any checks)

            return hook

        for name in ("embed", "blocks.0", "blocks.2"):
            net.get_submodule(name).register_forward_hook(seen(name))
    groups = (GroupConfig("top", modules, 1e-3, queries),)
    est = EstimatorConfig(kind=kind, share_prefix=share, max_rows=max_rows)
    engine = QueryEngine(net, groups, est, root_seed=5)
    engine.set_batch(0, torch.randn(4, 7, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))
    items = tuple(ShardItem(pos, 10 + pos, 0, queries, 1.0) for pos in (0, 2, 3)[:samples])
    task = ShardTask(kind=TaskKind.MAIN, step=0, group=0, index=0, items=items, weights=(1.0, 0.5, 0.25)[:samples])
    result = engine.run(task)
    return result.losses, result.grad, engine.estimators[0].prefix.cut


@pytest.mark.parametrize(
    ("modules", "cut", "per_sample"),
    [(TOP, "blocks.2", ("embed", "blocks.0")), (("head",), "head", ("embed", "blocks.0", "blocks.2"))],
)
@pytest.mark.parametrize("kind", ["lr", "spsa", "es"])
def test_blocks_below_the_group_run_once_per_sample_with_the_same_estimate(kind, modules, cut, per_sample):
    rows: dict[str, int] = {}
    losses, grad, found = _run(kind, share=True, rows=rows, modules=modules)
    assert found == cut
    want = {name: 3 if name in per_sample else 18 for name in ("embed", "blocks.0", "blocks.2")}
    assert rows == want, "the prefix ran per query, or rows were lost"
    whole_losses, whole_grad, _ = _run(kind, share=False, modules=modules)
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-12)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["lr", "es"])
def test_chunks_of_one_sample_share_the_prefix_with_the_same_estimate(kind):
    """Every chunk holds one sample's 6 queries: the first is checked beside another sample, then the prefix
    runs once per chunk (it ran per query before: 5x slower on the digits ViT when a sample's queries fill
    whole chunks)."""
    rows: dict[str, int] = {}
    losses, grad, found = _run(kind, share=True, rows=rows, max_rows=6)
    assert found == "blocks.2"
    assert rows == {"embed": 1, "blocks.0": 1, "blocks.2": 6}, "the prefix ran per query"
    whole_losses, whole_grad, _ = _run(kind, share=False, max_rows=6)
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-12)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("max_rows", [256, 6, 3])
def test_a_skip_around_the_cut_makes_every_query_run_the_whole_model(max_rows):
    """The embedding added back after the stack cannot meet fanned-out rows: the first chunk finds it, warns,
    and the estimate is the one of whole-model rows; also when that chunk holds one sample (checked beside a
    second one: alone, its single embedding row would broadcast over the rows and pass)."""
    with pytest.warns(UserWarning, match="cannot be shared"):
        losses, grad, cut = _run("spsa", share=True, skip=True, max_rows=max_rows)
    assert cut is None
    whole_losses, whole_grad, _ = _run("spsa", share=False, skip=True, max_rows=max_rows)
    np.testing.assert_array_equal(losses, whole_losses)
    np.testing.assert_array_equal(grad, whole_grad)


@pytest.mark.parametrize(
    ("samples", "queries", "max_rows", "warns"),
    [(1, 2, 2, False), (1, 4, 2, False), (1, 6, 6, True), (3, 6, 6, True)],
)
def test_a_group_linear_before_the_cut_is_never_shared_past(samples, queries, max_rows, warns):
    """``pre`` is perturbed per row but runs before the cut. Chunks of 2 rows of one sample are never checked
    (beside a second sample, a wrong pairing of 2 rows meets 2 probe rows and only the tolerance could see
    it: the gradient came out wrong, silently); larger chunks find it. Either way every row runs the whole model."""
    kw = dict(modules=("head", "pre"), max_rows=max_rows, samples=samples, queries=queries, model=HeadFirst)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, grad, _ = _run("lr", share=True, **kw)
    assert any("cannot be shared" in str(w.message) for w in caught) == warns
    whole_losses, whole_grad, _ = _run("lr", share=False, **kw)
    np.testing.assert_array_equal(losses, whole_losses)
    np.testing.assert_array_equal(grad, whole_grad)


class Squeezing(Stacked):
    """A prefix that drops the batch dimension of a batch of one (whole-model rows of a shard are never one)."""

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).squeeze(0)).mean(-2))


def test_a_prefix_failing_after_its_check_falls_back_to_the_whole_model():
    """The first chunk (two samples) passes the check; the next holds one sample, whose prefix output loses its
    batch dimension: that chunk, and every one after it, runs the whole model, with a warning."""
    kw = dict(max_rows=12, model=Squeezing)
    with pytest.warns(UserWarning, match="cannot be shared"):
        losses, grad, cut = _run("es", share=True, **kw)
    assert cut is None
    whole_losses, whole_grad, _ = _run("es", share=False, **kw)
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-12)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-9, atol=1e-12)


def test_share_prefix_is_a_config_field_resumes_may_change():
    from flops_ray.config import TrainConfig
    from flops_ray.config.plain import config_to_dict
    from flops_ray.training.state import config_mismatch

    cfg = TrainConfig()
    off = cfg.replace(estimator=dataclasses.replace(cfg.estimator, share_prefix=False))
    assert config_mismatch(config_to_dict(cfg), off) == []
