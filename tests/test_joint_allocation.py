"""Joint allocation (``allocator.joint``): one budget over (group, sample) cells, and the estimate stays unbiased.

The unbiasedness check is test_allocation_bias.py's, on a model with two layer groups: a two-layer linear
network with a per-sample quadratic loss ``L_j = 1/2 a_j |f(x_j) - t_j|^2``, ``a_j`` spread over two decades.
With one group perturbed at a time the loss is quadratic in that group's parameters (and in its outputs), so
SPSA's and LR's antithetic pair differences are exactly ``grad . eps``: any bias is the allocation's.

Tolerance from theory: over ``N`` seeds, Hotelling's ``T^2 = N d^T S^-1 d`` (``d`` the mean estimate minus the
exact gradient, ``S`` the estimates' sample covariance) is ``chi2_P`` under no bias for ``N >> P``;
``P(chi2_14 > 14 * 2.72) = 5e-4`` gives the bound ``T^2 / P < 2.8``. The projection on the gradient's direction
is one more ``N(0, 1)``: ``|z| < 4.5``. An estimate that weights every cell of a group by the group's mean
count instead of its own scores ``T^2 / P`` in the hundreds here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import flops_ray.step.forward as forward_module
from flops_ray.allocation.allocators import create_allocator
from flops_ray.allocation.joint import joint_counts, leveled
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import AllocatorConfig, ConfigError, EstimatorConfig, GroupConfig
from flops_ray.models.groups import resolve_groups
from flops_ray.replica.replica import Replica, ReplicaSpec
from flops_ray.step.forward import ForwardStep
from flops_ray.step.local_backend import LocalBackend

B, SEEDS = 8, 1500
_gen = torch.Generator().manual_seed(0)
X = torch.randn(B, 3, generator=_gen)
SCALE = torch.logspace(-1, 1, B)  # a_j
TARGET = torch.randn(B, 2, generator=_gen)  # t_j
Y = np.arange(B)  # a sample's label indexes its own a_j and t_j
GROUPS = (
    GroupConfig("lower", ("lower",), sigma=0.05, queries_per_sample=8),
    GroupConfig("upper", ("upper",), sigma=0.05, queries_per_sample=8),
)
SPSA, LR = EstimatorConfig(kind="spsa"), EstimatorConfig(kind="lr")


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lower = nn.Linear(3, 3)
        self.upper = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(x))


def quadratic(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(R, 2), (R,) -> (R,)`` per-sample ``1/2 a_j |f(x_j) - t_j|^2``."""
    return 0.5 * SCALE.to(outputs)[y] * ((outputs - TARGET.to(outputs)[y]) ** 2).sum(-1)


def exact_gradient() -> np.ndarray:
    """The batch mean loss's gradient over both groups' parameters, in the estimate's order ``(P,)``."""
    model = TwoLinear()
    params = [p for g in resolve_groups(model, GROUPS, linear_outputs=False) for _, p in g.params]
    loss = quadratic(model(X), torch.from_numpy(Y)).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double().numpy()


def _step(seed: int, allocator: AllocatorConfig, estimator: EstimatorConfig) -> ForwardStep:
    model = TwoLinear()
    groups = resolve_groups(model, GROUPS, linear_outputs=estimator.kind == "lr")
    return ForwardStep(
        LocalBackend(Replica(model, ReplicaSpec(GROUPS, estimator, root_seed=seed, loss_fn=quadratic))),
        groups=GROUPS,
        sizes=[g.size for g in groups],
        widths=[g.noise_width for g in groups],
        estimator=estimator,
        allocator=allocator,
        allocators=[create_allocator(allocator) for _ in GROUPS],
        memory=TraceMemory(len(GROUPS), B, allocator.memory_decay, allocator.memory_prior),
        shard_cost=1024,
        root_seed=seed,
    )


def _estimates(
    allocator: AllocatorConfig, estimator: EstimatorConfig = SPSA, seeds: int = SEEDS, step: int = 1
) -> tuple[np.ndarray, list]:
    """``(seeds, P)`` step-``step`` estimates of runs that differ only in their root seed (earlier steps feed the
    trace memory the joint allocation reads its groups' levels from), and the last run's counts."""
    out = []
    for seed in range(seeds):
        forward = _step(seed, allocator, estimator)
        for t in range(step + 1):
            reduced, report = forward(t, X.numpy(), Y, np.arange(B))
        out.append(np.concatenate(reduced.grads))
    return np.array(out), report.counts


def _bias_scores(grads: np.ndarray) -> tuple[float, float]:
    """Hotelling's ``T^2 / P`` of the mean estimate against the exact gradient, and the ``z`` along it."""
    exact = exact_gradient()
    d = grads.mean(0) - exact
    cov = np.cov(grads, rowvar=False)
    t2 = len(grads) * d @ np.linalg.solve(cov, d)
    u = exact / np.linalg.norm(exact)
    along = grads @ u
    return t2 / len(d), (along.mean() - exact @ u) / (along.std(ddof=1) / np.sqrt(len(grads)))


def test_joint_counts_spend_one_budget_over_all_cells():
    traces = [torch.tensor([1.0, 4.0, 9.0]), torch.tensor([100.0, 100.0, 0.0])]
    counts = joint_counts(traces, [12, 12], minimum=2, unit=2)
    assert [c.tolist() for c in counts] == [[2, 2, 2], [8, 8, 2]]
    # One group's budget goes to the other group's cells, never below the floor of a cell.
    assert sum(int(c.sum()) for c in counts) == 24
    assert all(int(c.min()) >= 2 for c in counts)


def test_leveled_scales_a_signal_to_its_groups_level():
    assert leveled(torch.tensor([1.0, 3.0]), 10.0).tolist() == [5.0, 15.0]
    assert leveled(torch.tensor([1.0, 3.0]), None) is None  # nothing measured yet: keep the groups' budgets
    assert leveled(torch.tensor([1.0, float("nan")]), 10.0) is None
    assert leveled(torch.zeros(2), 10.0) is None


def test_memory_group_mean_is_the_decayed_level_of_every_visit():
    mem = TraceMemory(groups=2, size=4, decay=0.5)
    assert mem.group_mean(0) is None
    mem.observe(0, torch.tensor([0, 1]), torch.tensor([2.0, 6.0]), torch.tensor([1.0, 3.0]))
    assert mem.group_mean(0) == pytest.approx((2 + 18) / 4) and mem.group_mean(1) is None


def test_joint_needs_neyman():
    with pytest.raises(ConfigError, match=r"allocator\.joint"):
        AllocatorConfig(kind="equal", joint=True).validate()


def test_noise_widths_are_output_widths_under_lr_and_none_otherwise():
    lr, spsa = resolve_groups(TwoLinear(), GROUPS, True), resolve_groups(TwoLinear(), GROUPS, False)
    assert [g.noise_width for g in lr] == [3.0, 2.0] and [g.noise_width for g in spsa] == [None, None]


@pytest.mark.parametrize("estimator, signal, moves_at", [(LR, "clean", 0), (SPSA, "clean", 1), (LR, "memory", 1)])
def test_joint_moves_budget_between_groups(estimator, signal, moves_at):
    """Under LR on clean-pass proxies times noise widths, from the first step; otherwise on the memory's levels,
    once it holds every group (before, each group keeps its budget). One budget of 2 x 64 over the 16 cells,
    never below the floor."""
    forward = _step(0, AllocatorConfig(joint=True, signal=signal), estimator)
    for step in range(moves_at + 1):
        _, report = forward(step, X.numpy(), Y, np.arange(B))
        sums = [int(c.sum()) for c in report.counts]
        assert sum(sums) == 128 and (sums != [64, 64]) == (step == moves_at), (step, sums)
    assert min(int(c.min()) for c in report.counts) >= 2


@pytest.mark.slow  # 1500 seeds of one or two steps: a minute or two of CPU each
@pytest.mark.parametrize("estimator, step", [(LR, 0), (SPSA, 1)])
def test_joint_estimate_is_unbiased(estimator, step):
    grads, counts = _estimates(AllocatorConfig(joint=True), estimator, step=step)
    assert [int(c.sum()) for c in counts] != [64, 64]  # the allocation under test really moved budget
    t2, z_along = _bias_scores(grads)
    assert t2 < 2.8, f"T^2 / P = {t2:.2f}"
    assert abs(z_along) < 4.5, f"along the gradient: z = {z_along:.2f}"


def test_the_check_fails_when_a_cells_weight_ignores_its_count(monkeypatch):
    """The same check, on an estimate that weights every cell of a group by ``1 / (B * mean count)``: it must fail,
    or the test above could not see a cell weighted apart from its count."""
    plan_main = forward_module.plan_main

    def mean_weights(step, group, counts, *args, **kwargs):
        tasks = plan_main(step, group, counts, *args, **kwargs)
        wrong = 1.0 / (len(counts) * counts.mean())
        return [dataclasses.replace(t, weights=tuple(wrong for _ in t.weights)) for t in tasks]

    monkeypatch.setattr(forward_module, "plan_main", mean_weights)
    # The bias is large: a few hundred seeds show it.
    t2, _ = _bias_scores(_estimates(AllocatorConfig(joint=True), seeds=300)[0])
    assert t2 > 2.8 * 10, f"T^2 / P = {t2:.2f}: the check does not see counts ignored"
