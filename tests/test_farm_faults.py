"""Faults the farm survives and the ones it reports at once, with the real cause (a real local Ray).

A storm of replica deaths is survived while shards keep finishing; an address where nothing answers,
replicas no node can hold and a cluster too small for the replicas asked for are named before step 0.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import threading
import time

import numpy as np
import pytest
import ray
import torch

from flops_ray.config import FarmConfig, TrainConfig
from flops_ray.data.arrays import ArrayDataset, batch_at
from flops_ray.farm.backend import RayBackend
from flops_ray.farm.errors import FarmError
from flops_ray.farm.fault_budget import FaultBudget
from flops_ray.farm.placement import check_placement
from flops_ray.farm.ray_init import wait_reachable
from flops_ray.models.factory import create_model
from flops_ray.models.losses import cross_entropy
from flops_ray.training.trainer import StopTraining, Trainer

RAY = FarmConfig(backend="ray", replicas=2, shard_cost=16)
"""The farm's defaults (retry budget, timeouts) but for the replica count of a 4-CPU test Ray."""
BASE = TrainConfig(model="digits_vit", batch_size=8, farm=RAY)


def _model(cfg: TrainConfig):
    return create_model(cfg.model, 10, 8, cfg.seed)


def test_budget_counts_failures_since_progress_and_backs_off():
    budget = FaultBudget(limit=4, backoff_s=0.5, max_backoff_s=1.5)
    for _ in range(4):
        budget.failure("a replica died", "killed")
    with pytest.raises(FarmError, match=r"5 replica failures in a row .*max_retries=4.*a replica died: killed"):
        budget.failure("a replica died", "killed\nmore detail")
    budget.progress()
    budget.failure("a replica died", "killed")  # refilled: far from the limit again
    assert [budget.backoff(n) for n in range(1, 6)] == [0.0, 0.5, 1.0, 1.5, 1.5]


def _free_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_within_the_connect_timeout():
    """Ray retries such an address forever; the farm names it instead."""
    port = _free_port()
    with pytest.raises(FarmError, match=rf"farm.address: nothing answers at 127.0.0.1:{port} within 1 s"):
        wait_reachable(f"127.0.0.1:{port}", 1.0)
    wait_reachable("auto", 1.0)  # Ray resolves these itself


@pytest.mark.usefixtures("ray_local")
def test_replicas_lost_while_starting_are_not_charged(digits_splits):
    """A preempted node takes replicas that never got to work: no evidence against the work, so even with
    ``max_retries=0`` the step finishes once a replica stays up (each loss backs off, none fails the farm)."""
    cfg = BASE.replace(farm=dataclasses.replace(RAY, replicas=1, max_retries=0))
    backend = RayBackend(cfg, _model(cfg))
    make, made = backend.pool.make_replica, []

    def short_lived(slot: int):
        handle = make(slot)
        made.append(handle)
        if len(made) <= 3:  # the first three replacements die before answering their sync
            ray.kill(handle, no_restart=True)
        return handle

    backend.pool.make_replica = short_lived
    ray.kill(backend.pool.slots[0].handle, no_restart=True)  # up, but not yet given a step
    with Trainer(cfg, _model(cfg), *digits_splits, backend_factory=lambda *_: backend) as trainer:
        assert np.isfinite(trainer.step().loss)
        assert backend.counters.restarts == 4 and len(made) == 4


def deadly_loss(out, y):
    """A loss that takes its replica down with it, on every call (a shard no replica survives)."""
    os._exit(1)


@pytest.mark.usefixtures("ray_local")
def test_a_shard_that_kills_every_replica_fails_the_farm(digits_splits):
    """Replicas that come up and die on the same work again and again are not progress: the budget ends it."""
    cfg = BASE.replace(farm=dataclasses.replace(RAY, replicas=1, max_retries=2, stall_timeout_s=300))
    with Trainer(cfg, _model(cfg), *digits_splits, loss_fn=deadly_loss) as trainer:
        with pytest.raises(FarmError, match=r"3 replica failures in a row .*running tasks \[\(0, "):
            trainer.step()
        assert trainer.backend.counters.restarts == 3


def dies_on_a_poison_sample(out, y):
    """A loss that takes its replica down when a row's outputs are not finite: a sample that crashes the replica
    (a decoder bug, a kernel fault) on every replica it lands on, whatever else runs beside it."""
    if not torch.isfinite(out).all():
        os._exit(1)
    return cross_entropy(out, y)


def _poisoned(train: ArrayDataset, cfg: TrainConfig, row: int) -> tuple[ArrayDataset, int]:
    """``train`` with the sample at ``row`` of step 0's batch made poison (infinite pixels); returns its index."""
    sample = int(batch_at(len(train), cfg.batch_size, cfg.seed, 0)[row])
    x = train.x.copy()
    x[sample] = np.inf
    return ArrayDataset(x, train.y), sample


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("replicas, row", [(2, 3), (1, 7)])
def test_a_poison_sample_is_named_by_its_dataset_index(digits_splits, replicas, row):
    """The sample kills every replica that runs it, beside the other samples of its clean task (the round's only
    task, so no replica ever proves itself on another): after ``poison_deaths`` lone deaths its samples are
    probed one by one, and the probe that kills two replicas that had run innocent probes names the sample.
    With one replica and the sample probed last, the replacement its first strike leaves has nothing to prove
    itself on but a proof (an innocent sample run again). It once ended after 11 deaths naming the task only."""
    cfg = BASE.replace(farm=dataclasses.replace(RAY, replicas=replicas))
    train, sample = _poisoned(digits_splits[0], cfg, row=row)
    with Trainer(cfg, _model(cfg), train, None, loss_fn=dies_on_a_poison_sample) as trainer:
        with pytest.raises(FarmError, match=rf"dataset sample {sample} \(batch row {row} of step 0\) kills the"):
            trainer.step()
        c = trainer.backend.counters
        assert c.probes >= cfg.batch_size + 1 and c.restarts <= cfg.farm.poison_deaths + 4, c


@pytest.mark.usefixtures("ray_local")
def test_a_poison_sample_is_skipped_when_asked(digits_splits):
    """``farm.skip_poison``: the step runs again without the sample, which the report lists and the counters
    count; later steps go on."""
    cfg = BASE.replace(farm=dataclasses.replace(RAY, skip_poison=True))
    train, sample = _poisoned(digits_splits[0], cfg, row=5)
    with Trainer(cfg, _model(cfg), train, None, loss_fn=dies_on_a_poison_sample) as trainer:
        first, second = trainer.step(), trainer.step()
        assert first.skipped_samples == (sample,) and len(first.losses) == cfg.batch_size - 1
        assert np.isfinite(first.loss) and np.isfinite(second.loss) and second.skipped_samples == ()
        assert trainer.backend.counters.skipped_samples == 1


def _until_dead(handle, hang: float = 60.0) -> None:
    """Wait until a killed actor answers no more (``ray.kill`` is asynchronous). A deadline only stops a hang."""
    deadline = time.monotonic() + hang
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:  # calls made before the kill landed still answer
            ray.get(handle.describe.remote(), timeout=hang)


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("late", [False, True])
def test_every_replica_killed_at_its_first_shard_is_survived(digits_splits, late):
    """The 20 first replicas, the two initial ones and 18 replacements, each killed at its first shard, at the
    default settings. The kill lands as the shard starts (no result in between: 20 deaths in a row, at the
    default ``max_retries``), or, ``late``, a probe's kill lands once the probe is done: the replica is proven,
    and the next probe it is sent finds it dead (a clean clone's suite met this race and named an innocent
    sample). The clean round's one task dies alone again and again, so its samples are probed; no sample is
    named, and the parameters are those of an in-process run, bit for bit."""
    cfg = BASE.replace(steps=2)
    killed: list = []
    with Trainer(cfg, _model(cfg), *digits_splits) as stormy:
        work, hunt = stormy.backend.pool.work, stormy.backend.scheduler.hunt
        track = work.track

        def first_shard_kills(slot, ref, position) -> None:
            track(slot, ref, position)
            if slot.handle not in killed and len(killed) < 20:
                killed.append(slot.handle)
                if late and not hunt.own(position):
                    ray.wait([ref], timeout=60)
                ray.kill(slot.handle, no_restart=True)
                _until_dead(slot.handle)

        work.track = first_shard_kills
        stormy.fit()
        got = torch.from_numpy(stormy.get_params())
        assert len(killed) == 20 and stormy.backend.counters.restarts >= 20
    local = cfg.replace(farm=dataclasses.replace(cfg.farm, backend="local"))
    with Trainer(local, _model(local), *digits_splits) as straight:
        straight.fit()
        want = torch.from_numpy(straight.get_params())
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3g}"


@pytest.mark.usefixtures("ray_local")
def test_unplaceable_replicas_fail_at_once_naming_the_resource():
    """More GPUs per replica than any node has: the error names the GPU, before any step (not a stall)."""
    cfg = BASE.replace(farm=dataclasses.replace(RAY, num_gpus_per_replica=2, stall_timeout_s=5))
    with pytest.raises(FarmError, match=r"no replica can be placed .*GPU 2 but no node has more than 1"):
        RayBackend(cfg, _model(cfg))
    assert ray.is_initialized()  # the test's Ray, which the backend did not start, is left alone


@pytest.mark.usefixtures("ray_local")
def test_fewer_replicas_than_asked_warn_and_the_run_goes_on(digits_splits):
    """Five 1-CPU replicas on a 4-CPU Ray: a warning says 4 of 5 fit, and the run starts on those."""
    cfg = BASE.replace(farm=dataclasses.replace(RAY, replicas=5, num_cpus_per_replica=1))
    with pytest.warns(RuntimeWarning) as caught, Trainer(cfg, _model(cfg), *digits_splits) as trainer:
        trainer.step()
        assert trainer.backend.where().startswith("4 of 5 replicas ready on cpu")
    texts = [str(w.message) for w in caught]
    assert any("hold 4 of the 5 replicas" in t and "CPU 1" in t for t in texts), texts


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_kill_storm_at_default_settings_is_survived(digits_splits):
    """20 replica kills, one every 1-3 s on a random replica (busy, idle or still starting, both at once too),
    at default settings (LR: all-reduce, replicas own the parameters, Adam): the run goes on, and its parameters
    equal an uninterrupted in-process run of as many steps on one thread (as each replica runs), bit for bit (the
    all-reduce once summed in completion order, and Adam's division by sqrt(v) grew that rounding to lr-sized steps
    in near-zero coordinates)."""
    cfg = BASE.replace(steps=1_000_000)
    kills: list[int] = []
    rng = random.Random(0)

    def storm(trainer: Trainer, stop: threading.Event) -> None:
        killed = set()
        while len(kills) < 20 and not stop.wait(rng.uniform(1.0, 3.0)):
            handle = rng.choice(trainer.backend.pool.slots).handle
            # None: a replacement waiting out its backoff; a killed one not yet replaced is dead already.
            if handle is not None and handle not in killed:
                killed.add(handle)
                ray.kill(handle, no_restart=True)
                kills.append(trainer.step_count)

    def after_the_storm(trainer: Trainer, report) -> None:
        # Every kill noticed (a kill lands between steps too, and shows at the next sync).
        if len(kills) == 20 and trainer.backend.counters.restarts >= 20:
            raise StopTraining("storm over")
        assert killer.is_alive() or len(kills) == 20, "the killer thread died"

    stop = threading.Event()
    with Trainer(cfg, _model(cfg), *digits_splits) as stormy:
        killer = threading.Thread(target=storm, args=(stormy, stop), daemon=True)
        killer.start()
        try:
            stormy.fit(hooks=[after_the_storm])
        finally:
            stop.set()
            killer.join()
        steps, got = stormy.step_count, torch.from_numpy(stormy.get_params())
        restarts = stormy.backend.counters.restarts
    assert len(kills) == 20 and restarts == 20, (kills, restarts)
    local = cfg.replace(farm=dataclasses.replace(cfg.farm, backend="local"))
    with Trainer(local, _model(local), *digits_splits) as straight:
        straight.fit(steps)
        want = torch.from_numpy(straight.get_params())
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3g}"


@pytest.mark.usefixtures("ray_local")
def test_more_replica_cpus_than_cores_say_so():
    """A local farm reserving more CPUs than the machine has cores runs, but not silently."""
    cores = os.cpu_count() or 1
    with pytest.warns(RuntimeWarning, match=rf"{cores + 1} replicas x 1 CPU on a machine with {cores} cores"):
        check_placement(dataclasses.replace(RAY, replicas=cores + 1, num_cpus_per_replica=1), local=True)


@pytest.mark.usefixtures("ray_local")
def test_a_replica_whose_constructor_raises_fails_the_start_with_its_error():
    """Not retried: every replacement would raise the same; the one line says why."""
    cfg = BASE.replace(groups=(dataclasses.replace(BASE.groups[0], modules=("no_such_module",)),))
    with pytest.raises(FarmError, match=r"a replica failed to start: .*ConfigError.*no_such_module"):
        RayBackend(cfg, _model(cfg))
