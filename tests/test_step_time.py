"""The farm's step-time model: rounds, the allocator fit in its thread, the reductions."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from flops_ray.studies.step_time import Costs, Workload, efficiency, round_time, step_time

WORK = Workload(rounds=((64, 16), (1024, 64)), params=10_000, reduction="allreduce", groups=((10_000, 16),))
COSTS = Costs(query_s=1e-3, call_s=1e-4, driver_s=0.01, link_bytes_per_s=1e9)


def test_a_round_is_its_waves_of_shards():
    # 1024 forwards in 16 shards of 64 on 4 replicas: 4 waves of 64 ms, plus the last call's latency.
    assert round_time(1024, 64, 4, COSTS) == pytest.approx(4 * 64e-3 + 1e-4)
    # Dispatch-bound: 1000 one-forward shards cost the driver 0.1 s, more than the replicas' 1 ms waves.
    assert round_time(1000, 1, 1000, COSTS) == pytest.approx(1000 * 1e-4 + 1e-4)


def test_the_fit_costs_only_what_outlasts_the_step_less_the_drivers_work():
    base = step_time(WORK, COSTS, 4)
    window = base["total"] - COSTS.driver_s
    hidden = step_time(WORK, dataclasses.replace(COSTS, fit_s=0.99 * window), 4)
    assert hidden["total"] == pytest.approx(base["total"]) and hidden["fit_wait"] == 0
    longer = step_time(WORK, dataclasses.replace(COSTS, fit_s=window + 0.2), 4)
    assert longer["total"] == pytest.approx(base["total"] + 0.2)


def test_efficiency_falls_as_fixed_costs_outweigh_the_shared_work():
    curve = [efficiency(WORK, COSTS, n) for n in (1, 2, 4, 16)]
    assert curve[0] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(curve))
    assert all(0 < e <= 1 for e in curve)


def test_sliced_replay_shares_the_replay_and_pays_one_gather():
    """Each of ``n`` replicas rebuilds ``1/n`` of the noise and receives the others' float64 sums once."""
    work = dataclasses.replace(WORK, reduction="scalar", replay_numbers=10**9)
    costs = dataclasses.replace(COSTS, replay_s_per_number=1e-9)
    full, sliced = step_time(work, costs, 8), step_time(dataclasses.replace(work, reduction="sliced"), costs, 8)
    gather = 8 * 10_000 * 7 / 8 / 1e9 + 7 * costs.link_latency_s
    assert full["reduce"] - sliced["reduce"] == pytest.approx(1.0 - 1.0 / 8 - gather)
    assert step_time(dataclasses.replace(work, reduction="sliced"), costs, 1) == step_time(work, costs, 1)


def test_the_exact_allreduce_moves_each_members_tasks_and_the_sums():
    """Owner-sum: 16 tasks on 4 replicas send 4 partials' worth each, plus the float64 sums, 3/4 of it on the link."""
    got = step_time(WORK, COSTS, 4)["reduce"]
    sent = (4 * 10_000 * 4 + 8 * 10_000) * 3 / 4
    assert got == pytest.approx(sent / 1e9 + 2 * 3 * COSTS.link_latency_s + 2 * COSTS.call_s)


def test_the_drivers_calls_to_every_replica_grow_with_the_replicas():
    """The batch and the update go to each replica (and the all-reduce's collective call): ``n`` calls apiece."""
    costs = dataclasses.replace(COSTS, fanout_s=1e-4)
    assert step_time(WORK, costs, 64)["fanout"] == pytest.approx(64 * 3 * 1e-4)
    scalar = dataclasses.replace(WORK, reduction="scalar")
    assert step_time(scalar, costs, 64)["fanout"] == pytest.approx(64 * 2 * 1e-4)
