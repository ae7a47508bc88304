"""The farm's step-time model: rounds, the allocator fit in its thread, the reductions."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from flops_ray.studies.step_time import Costs, Workload, efficiency, round_time, step_time

WORK = Workload(rounds=((64, 16), (1024, 64)), params=10_000, reduction="allreduce")
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
