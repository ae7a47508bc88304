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

import numpy as np
import pytest
import ray
import torch

from flops_ray.config import FarmConfig, TrainConfig
from flops_ray.farm.backend import RayBackend
from flops_ray.farm.errors import FarmError
from flops_ray.farm.fault_budget import FaultBudget
from flops_ray.farm.placement import check_placement
from flops_ray.farm.ray_init import wait_reachable
from flops_ray.models.factory import create_model
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
    at default farm settings (LR: all-reduce, replicas own the parameters), SGD: the run goes on, and its parameters
    equal an uninterrupted run of as many steps (within the all-reduce's rounding: it sums in completion order)."""
    # SGD: Adam divides by sqrt(v), so in coordinates whose gradient is nearly zero it turns the all-reduce's
    # rounding (a recomputed partial lands in another replica's sum) into steps of size lr, far above 1e-6.
    cfg = BASE.replace(steps=1_000_000, optimizer="sgd")
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
    # The same farm without kills: float32 shard sums round by the replicas' thread count, so an in-process
    # run on another number of threads agrees only to rounding (tests/test_farm_determinism.py).
    with Trainer(cfg, _model(cfg), *digits_splits) as straight:
        straight.fit(steps)
        want = torch.from_numpy(straight.get_params())
    assert torch.allclose(got, want, atol=1e-6), f"max diff {(got - want).abs().max().item():.3g}"


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
