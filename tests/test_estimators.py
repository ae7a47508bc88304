"""Estimators: unbiased against autograd, additive over query ranges, noise a pure function of its counters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from flops_ray.config import EstimatorConfig, GroupConfig
from flops_ray.estimators import RowPlan
from flops_ray.estimators.noise_layout import NoiseLayout
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models.losses import cross_entropy
from flops_ray.replica.engine import NonFiniteLossError, QueryEngine


class TokenMLP(nn.Module):
    """Token-shaped ``(B, T, C)`` input through two linears: exercises LR's per-token sums."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)).mean(1))


class NormedTokenMLP(TokenMLP):
    """:class:`TokenMLP` with a layer norm between the linears: a group owned by linears and a norm."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))).mean(1))


def _engine(
    kind: str,
    sigma: float = 1e-3,
    antithetic: bool = True,
    trace_coords: int = 512,
    noise: str = "gaussian",
    model_class: type[nn.Module] = TokenMLP,
) -> tuple[QueryEngine, torch.Tensor, float]:
    torch.manual_seed(0)
    model = model_class().double()
    groups = (
        GroupConfig("all", ("fc1", "norm", "fc2") if model_class is NormedTokenMLP else ("fc1", "fc2"), sigma, 2),
    )
    est = EstimatorConfig(kind=kind, antithetic=antithetic, trace_coords=trace_coords, noise=noise)
    engine = QueryEngine(model, groups, est, root_seed=7)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    y = torch.tensor([1, 2])
    engine.set_batch(0, x, y)
    loss = cross_entropy(model(x[:1]), y[:1]).sum()
    params = [p for _, p in engine.groups[0].params]
    true = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    return engine, true, loss.item()


def _main(step: int, index: int, items: tuple[ShardItem, ...], weights: tuple[float, ...]) -> ShardTask:
    return ShardTask(kind=TaskKind.MAIN, step=step, group=0, index=index, items=items, weights=weights)


def _block_means(engine: QueryEngine, baseline: float, blocks: int, per_block: int) -> torch.Tensor:
    """``(blocks, P)`` independent per-block mean estimates for sample 0 (disjoint query ranges)."""
    out = []
    for k in range(blocks):
        item = ShardItem(0, 11, k * per_block, (k + 1) * per_block, baseline)
        out.append(torch.from_numpy(engine.run(_main(0, k, (item,), (1.0 / per_block,))).grad))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("kind", "antithetic", "noise"),
    [
        ("lr", True, "gaussian"),
        ("lr", False, "gaussian"),
        ("spsa", True, "gaussian"),
        ("es", False, "gaussian"),
        ("spsa", True, "rank1"),
        ("es", False, "rank1"),
    ],
)
def test_estimator_is_unbiased(kind, antithetic, noise):
    """z-scores of the block means against autograd follow N(0, 1) coordinate by coordinate.

    With K = 40 independent blocks the per-coordinate t-statistic has variance (K-1)/(K-3) = 1.05, so
    mean(z^2) over the P = 83 coordinates has mean 1.05. The coordinates are correlated (a query's terms
    share its noise and activations): for z ~ N(0, R), Var(sum z^2) = 2 sum_ij R_ij^2, so the spread of
    mean(z^2) is sqrt(2 sum R^2) / P with R the coordinates' correlation, measured from the same blocks;
    4 sd is allowed. A bias of even a few standard errors, or a wrong scale, pushes it far outside.
    sigma = 1e-3 in float64 keeps the O(sigma^2) smoothing bias ~1e-6 of the gradient, far below the
    standard errors.
    """
    engine, true, clean = _engine(kind, antithetic=antithetic, noise=noise)
    means = _block_means(engine, clean, blocks=40, per_block=200)
    est = means.mean(0)
    se = means.std(0, unbiased=True) / means.shape[0] ** 0.5
    z2 = ((est - true) / se) ** 2
    sd = (2 * (torch.corrcoef(means.T) ** 2).sum()).sqrt().item() / len(true) * 1.05
    assert abs(z2.mean().item() - 1.05) < 4 * sd, f"mean z^2 = {z2.mean().item():.3f}, sd {sd:.3f}"
    # Cosine: ||est - g||^2 is about sum(se^2); allow 3x that, which is far beyond its spread.
    err = (est - true).norm() ** 2
    assert err < 3 * (se**2).sum()
    cos = torch.nn.functional.cosine_similarity(est, true, 0).item()
    predicted = 1 / (1 + (se**2).sum() / true.norm() ** 2) ** 0.5
    assert cos > min(0.9, predicted.item() - 0.05), f"cosine {cos:.3f}, predicted {predicted.item():.3f}"


def test_ranges_sum_to_the_whole():
    """One sample's estimate over [0, 24) equals the sum over [0, 8), [8, 10), [10, 24)."""
    engine, _, clean = _engine("lr", sigma=0.1)
    whole = engine.run(_main(0, 0, (ShardItem(0, 3, 0, 24, clean),), (1.0,))).grad
    parts = sum(
        engine.run(_main(0, i, (ShardItem(0, 3, a, b, clean),), (1.0,))).grad
        for i, (a, b) in enumerate([(0, 8), (8, 10), (10, 24)])
    )
    # Shard sums are float32: 24 terms in another order differ by a few float32 roundings of the largest.
    np.testing.assert_allclose(parts, whole, rtol=0, atol=24 * 2**-23 * np.abs(whole).max())


@pytest.mark.parametrize("kind", ["spsa", "es"])
def test_rank1_noise_replays_to_the_shards_gradient(kind):
    """The scalar protocol's replay of rank-1 draws (one matmul per matrix) gives the shard's own sum."""
    engine, _, clean = _engine(kind, sigma=0.1, noise="rank1")
    task = _main(0, 0, (ShardItem(0, 9, 0, 8, clean), ShardItem(1, 5, 2, 12, clean)), (0.5, 0.25))
    direct = engine.run(task).grad
    (replayed,) = engine.replay([task], [engine.run(task, coefficients=True).coefs])
    np.testing.assert_allclose(replayed.numpy(), direct, rtol=1e-5, atol=1e-6 * np.abs(direct).max())


@pytest.mark.parametrize("model_class", [TokenMLP, NormedTokenMLP])
@pytest.mark.parametrize("kind", ["spsa", "es"])
def test_rank1_linears_run_factored_with_the_per_row_results(kind, model_class):
    """Under rank-1 noise the group's linears run ``x W^T + b + a (x v) u^T + a z`` per row instead of forming
    per-row weights, and its other modules (a layer norm) get per-row parameters of their own only: the same
    losses as the per-row path over the formed draws (the gradient and trace coordinates read the streams on
    both paths; tests/test_noise.py checks those against the formed draws)."""
    engine, _, clean = _engine(kind, sigma=0.1, noise="rank1", model_class=model_class)
    assert engine.estimators[0]._blocks is not None, "rank-1 noise should be read from its streams"
    task = _main(0, 0, (ShardItem(0, 9, 0, 8, clean), ShardItem(1, 5, 2, 12, clean)), (0.5, 0.25))
    task = dataclasses.replace(task, traces=True)
    factored = engine.run(task)
    engine.estimators[0]._blocks = None  # the per-row path, from the formed draws
    per_row = engine.run(task)
    # The per-row path forms u v^T in float32 (one rounding, 2^-24 relative) before the float64 model reads it.
    np.testing.assert_allclose(factored.losses, per_row.losses, rtol=1e-6)
    np.testing.assert_allclose(factored.grad, per_row.grad, rtol=1e-5, atol=1e-6 * np.abs(per_row.grad).max())
    np.testing.assert_allclose(factored.traces, per_row.traces, rtol=1e-5)


class _Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return self.gain * x


class ConvGainLinear(nn.Module):
    """A 1x1 convolution (a 4-D weight, rank-1 as ``out x in*kh*kw``) and a scalar gain before a linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)
        self.gain = _Gain()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.gain(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["spsa", "es"])
def test_rank1_convolutions_and_scalars_get_their_own_rows_in_shape(kind):
    """Per-row parameters built from the streams take each parameter's shape, whatever its dimensions: a 4-D
    convolution weight whose input channels equal the chunk's rows (4), where a misplaced row dimension
    broadcasts silently, and a 0-D gain."""
    torch.manual_seed(0)
    model = ConvGainLinear().double()
    est = EstimatorConfig(kind=kind, noise="rank1", max_rows=4)
    engine = QueryEngine(model, (GroupConfig("all", ("conv", "gain", "fc"), 0.1, 2),), est, root_seed=7)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    engine.set_batch(0, x, torch.tensor([1, 2]))
    task = _main(0, 0, (ShardItem(0, 9, 0, 8, 1.0), ShardItem(1, 5, 2, 12, 1.0)), (0.5, 0.25))
    assert engine.estimators[0]._blocks is not None
    factored = engine.run(task)
    engine.estimators[0]._blocks = None
    np.testing.assert_allclose(factored.losses, engine.run(task).losses, rtol=1e-6)


def test_query_noise_is_a_pure_function_of_its_counters():
    """The same query gives the same loss in another replica, inside a different shard."""
    a, _, clean = _engine("spsa", sigma=0.1)
    b, _, _ = _engine("spsa", sigma=0.1)
    alone = a.run(_main(0, 0, (ShardItem(1, 5, 4, 6, clean),), (1.0,))).losses
    packed = b.run(_main(0, 0, (ShardItem(0, 9, 0, 4, clean), ShardItem(1, 5, 0, 8, clean)), (1.0, 1.0))).losses
    np.testing.assert_array_equal(alone, packed[4 + 4 : 4 + 6])
    other_step = b
    other_step.set_batch(1, *a.batch())
    moved = other_step.run(_main(1, 0, (ShardItem(1, 5, 4, 6, clean),), (1.0,))).losses
    assert not np.array_equal(alone, moved), "a new step must draw new noise"


def test_antithetic_pair_shares_one_draw():
    """SPSA pair: the two losses straddle the clean loss symmetrically to first order."""
    engine, _, clean = _engine("spsa", sigma=1e-4)
    losses = engine.run(_main(0, 0, (ShardItem(0, 2, 0, 2, clean),), (1.0,))).losses
    assert abs((losses[0] + losses[1]) / 2 - clean) < 1e-7
    assert abs(losses[0] - clean) > 1e-7


def test_pilot_traces_match_sample_variance():
    """The pilot's trace estimate agrees with the variance of per-pair estimates measured directly."""
    engine, _, clean = _engine("spsa", sigma=1e-3, trace_coords=10_000)  # all 83 coordinates
    item = ShardItem(0, 4, 0, 2000, clean)
    trace = engine.run(ShardTask(kind=TaskKind.PILOT, step=0, group=0, index=0, items=(item,))).traces[0]
    pairs = _block_means(engine, clean, blocks=300, per_block=2)
    direct = 2 * pairs.var(0, unbiased=True).sum().item()
    # Both are variance estimates from ~1000 and 300 draws: relative sd about 10%.
    assert trace == pytest.approx(direct, rel=0.35)


def test_nonfinite_loss_names_shard_and_row():
    engine, _, clean = _engine("spsa", sigma=1e-3)
    x, y = engine.batch()
    engine.set_batch(0, torch.where(torch.arange(x.numel()).view_as(x) == 0, float("nan"), x), y)
    with pytest.raises(NonFiniteLossError, match=r"shard .* batch row 0"):
        engine.run(_main(0, 0, (ShardItem(0, 2, 0, 2, clean),), (1.0,)))


def test_clean_pass_proxy_survives_in_place_ops_after_a_group_linear():
    """A ReLU(inplace=True) right after a perturbed linear must neither fail nor change the recorded output."""
    from flops_ray.allocation.trace_proxy import clean_pass
    from flops_ray.models.groups import resolve_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    groups = resolve_groups(model, (GroupConfig("first", ("0",), 0.1, 2),), linear_outputs=True)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    losses, _, proxy = clean_pass(model, groups, x, y, cross_entropy)
    assert torch.allclose(losses, cross_entropy(model(x), y))
    # dL/dy of the first linear, by autograd on the whole model, gives the same proxy.
    y1 = model[0](x).detach().requires_grad_(True)
    (e,) = torch.autograd.grad(cross_entropy(model[2](torch.relu(y1)), y).sum(), y1)
    want = (e.double() ** 2).sum(1) * ((x.double() ** 2).sum(1) + 1)
    assert torch.allclose(proxy[:, 0], want)


class _Attend(nn.Module):
    """A group module called with keyword arguments and returning a tuple: it cannot run per row alone."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(1))


def test_spsa_runs_modules_that_cannot_run_per_row_through_the_whole_model():
    """Keyword arguments and tuple outputs send SPSA to the whole-model vmap, with the same losses."""
    torch.manual_seed(0)
    model = _Attend().double()
    groups = (GroupConfig("attn", ("attn",), 1e-3, 2),)
    engine = QueryEngine(model, groups, EstimatorConfig(kind="spsa"), root_seed=3)
    engine.set_batch(0, torch.randn(2, 5, 6, dtype=torch.float64), torch.tensor([0, 2]))
    task = _main(0, 0, (ShardItem(0, 1, 0, 4, 0.0), ShardItem(1, 2, 0, 4, 0.0)), (1.0, 1.0))
    losses = engine.run(task).losses
    assert engine.estimators[0]._whole_model
    params = engine.groups[0].params
    theta = torch.cat([p.detach().flatten() for _, p in params])
    rows = RowPlan.of(task, 2, 3, torch.device("cpu"))
    eps = rows.draws(slice(0, 8), NoiseLayout.dense(len(theta)), torch.float64).rows()
    x, y = engine.batch()
    expected = []
    for r in range(8):  # rows 0-3 are sample 0's two pairs, rows 4-7 sample 1's
        row = torch.split(theta + 1e-3 * eps[r], [p.numel() for _, p in params])
        shaped = {n: v.view_as(p) for (n, p), v in zip(params, row)}
        out = torch.func.functional_call(model, shaped, (x[r // 4 : r // 4 + 1],))
        expected.append(cross_entropy(out, y[r // 4 : r // 4 + 1]).item())
    np.testing.assert_allclose(losses, expected, rtol=1e-10)
