"""Dispatch on a real local Ray: one round per step without a read pilot, load balancing, retry limits and the
driver actor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray
import torch

from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, TrainConfig
from flops_ray.farm.backend import RayBackend
from flops_ray.farm.errors import FarmError
from flops_ray.farm.replica_actor import ReplicaOptions
from flops_ray.farm.task_costs import TaskCosts
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models.factory import create_model
from flops_ray.training.driver import start_driver
from flops_ray.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("ray_local")

BASE = TrainConfig(
    model="digits_vit",
    batch_size=8,
    # A reused pilot (run with the main queries); 1 clean and 16 main tasks a step.
    estimator=EstimatorConfig(pilot_queries=4),
    allocator=AllocatorConfig(kind="neyman"),
    farm=FarmConfig(backend="ray", replicas=3, shard_cost=16, clean_shard=8, num_cpus_per_replica=1),
)


@pytest.fixture(scope="module")
def data(digits_splits):
    return digits_splits


def _cfg(**farm) -> TrainConfig:
    return BASE.replace(farm=dataclasses.replace(BASE.farm, **farm))


def _model(cfg: TrainConfig):
    return create_model("digits_vit", 10, 8, cfg.seed)


def test_a_pilot_nothing_reads_runs_with_the_main_queries(data, recorded):
    """A reused pilot (the allocation reads the clean pass) adds no round: a step is one clean and one main
    round and runs exactly its budget of queries; no task spends time on per-sample traces nothing reads (a step
    of gradient-quality telemetry reads them: ``estimator.telemetry_every``)."""
    for every, traced in ((0, False), (1, True)):
        cfg = _cfg().replace(estimator=dataclasses.replace(BASE.estimator, telemetry_every=every))
        with Trainer(cfg, _model(cfg), *data, backend_factory=recorded) as trainer:
            report = trainer.step()
            (clean, _), (main, results) = trainer.backend.runs
        assert {t.kind for t in clean} == {TaskKind.CLEAN} and {t.kind for t in main} == {TaskKind.MAIN}
        assert all(bool(t.traces) == (r.traces is not None) == traced for t, r in zip(main, results))
        assert report.queries == sum(g.queries_per_sample for g in cfg.groups) * cfg.batch_size


def test_faster_replica_takes_more_shards(data):
    """Completion-order dispatch: a replica slowed 10x ends up with a fraction of the forwards."""
    # Shards of ~10 ms, so that work, not the ~1 ms call overhead, sets each replica's pace.
    cfg = _cfg(replicas=2, shard_cost=64).replace(batch_size=32)
    backend = RayBackend(cfg, _model(cfg), replica_options=[ReplicaOptions(), ReplicaOptions(slowdown=10.0)])
    with Trainer(cfg, _model(cfg), *data, backend_factory=lambda *_: backend) as trainer:
        trainer.fit(2)
        fast, slow = ray.get([s.handle.stats.remote() for s in backend.pool.slots])
    assert fast.forwards > 2 * slow.forwards > 0


def _task(group: int, index: int, queries: int) -> ShardTask:
    return ShardTask(TaskKind.MAIN, 0, group, index, (ShardItem(index, index, 0, queries),), weights=(0.1,))


def _two_replicas_up(cfg: TrainConfig, data) -> RayBackend:
    """A backend whose two replicas have both answered their sync and run tasks (a run reads the answers)."""
    backend = RayBackend(cfg, _model(cfg))
    backend.sync(0, data[0].x[:8], data[0].y[:8])
    warm = [_task(g, i, 2) for g in (0, 1) for i in range(4)]
    for _ in range(1000):
        if backend.pool.up == 2:
            break
        backend.run(warm)
    backend.run(warm)
    assert backend.pool.up == 2
    return backend


def test_a_replaced_replica_leaves_the_task_costs(data):
    """A dead replica's learned slowness goes with it: a long run with many deaths keeps none."""
    backend = _two_replicas_up(_cfg(replicas=2), data)
    try:
        costs = backend.scheduler.costs
        assert costs.replicas == 2
        backend.pool.replace(backend.pool.slots[0], "a replica died", "killed by the test", charge=False)
        assert costs.replicas == 1
        costs.forget(backend.pool.slots[1].handle)
        assert costs.replicas == 0, "the live replica's entry should have been the one left"
    finally:
        backend.close()


def test_longest_expected_tasks_go_one_per_replica(data):
    """Tasks are ordered by learned seconds, not counted forwards, and the first calls go one per replica in
    that order. Forwards 64 (cheap group) and 32, 24, 16 (a group whose forwards cost 10x): by seconds the
    replicas get 32 + 16 and 24 + 64; by forwards 64 + 24 and 32 + 16; filling one replica first gives
    32 + 24 and 16 + 64 by seconds, 64 + 32 and 24 + 16 by forwards (the old scheduler)."""
    cfg = _cfg(replicas=2)
    backend = _two_replicas_up(cfg, data)
    try:
        cheap, costly = [_task(1, 0, 64)], [_task(0, i, q) for i, q in enumerate((32, 24, 16))]
        backend.scheduler.costs = TaskCosts(smoothing=1.0)
        backend.scheduler.costs.learn(cheap[0], seconds=0.064)
        backend.scheduler.costs.learn(costly[0], seconds=0.32)
        handles = [s.handle for s in backend.pool.slots]
        before = [s.forwards for s in ray.get([h.stats.remote() for h in handles])]
        backend.run(cheap + costly)  # 2 replicas x 2 calls in flight: all four go out at once
        after = [s.forwards for s in ray.get([h.stats.remote() for h in handles])]
    finally:
        backend.close()
    assert [a - b for a, b in zip(after, before)] == [48, 88]


def test_gives_up_after_max_retries(data, inject_fault):
    """More than ``max_retries`` deaths with no shard finishing in between fail the step, naming the tasks."""
    cfg = _cfg(max_retries=0)
    with Trainer(cfg, _model(cfg), *data) as trainer:
        trainer.step()  # every replica is up, so the kill below lands on shards in flight
        # 1 clean task per step; the 7th result falls among the 16 main shards.
        inject_fault(trainer.backend, after=trainer.backend.counters.accepted + 7)
        with pytest.raises(FarmError, match=r"1 replica failures in a row .*max_retries=0.*running tasks \[\(1, "):
            trainer.step()


def test_driver_actor_matches_in_process(data):
    """The step loop inside a Ray actor, driven by a thin client, trains exactly like the local trainer."""
    cfg = _cfg(replicas=2)
    with Trainer(cfg.replace(farm=FarmConfig()), _model(cfg), *data) as local:
        local.fit(2)
        want = torch.from_numpy(local.get_params())
        local_accuracy = local.evaluate()
    driver = start_driver(cfg, _model(cfg), *data)
    try:
        logs = ray.get(driver.fit.remote(2))
        assert [log.step for log in logs] == [0, 1]
        got = torch.from_numpy(np.array(ray.get(driver.get_params.remote())))
        assert torch.allclose(got, want, atol=1e-6)
        # The same parameters give the same predictions: the hosted trainer evaluates what it trained.
        assert ray.get(driver.evaluate.remote()) == local_accuracy
        ray.get(driver.close.remote())
    finally:
        ray.kill(driver)
