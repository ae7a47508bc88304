"""The farm gives the in-process result bit for bit (``torch.equal``): any number of replicas, any speeds, a replica
killed mid-step, all-reduce, the scalar protocol; replicas that drift apart fail loudly.

docs/DESIGN.md section 2: a step depends only on seed, step, params, batch and config, never on which
replica ran which shard or on retries.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import ray
import torch

from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, TrainConfig
from flops_ray.data.arrays import digits
from flops_ray.farm.backend import RayBackend
from flops_ray.farm.errors import FarmError
from flops_ray.farm.replica_actor import ReplicaOptions
from flops_ray.models.factory import create_model
from flops_ray.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("ray_local")

STEPS = 3
BASE = TrainConfig(
    model="digits_vit",
    batch_size=8,
    steps=STEPS,
    # A reused pilot: 17 tasks a step (1 clean, 16 main), which the fault tests' timings count on.
    estimator=EstimatorConfig(pilot_queries=4),
    allocator=AllocatorConfig(kind="gaussian", gaussian_iters=3),
    farm=FarmConfig(backend="ray", replicas=3, shard_cost=16, clean_shard=8, num_cpus_per_replica=1),
)


@pytest.fixture(scope="module")
def data():
    return digits("train"), None


def _trainer(data, backend_factory=None, spsa: bool = False, **farm) -> Trainer:
    cfg = BASE.replace(farm=dataclasses.replace(BASE.farm, **farm))
    if spsa:
        cfg = cfg.replace(estimator=dataclasses.replace(cfg.estimator, kind="spsa"))
    return Trainer(cfg, create_model("digits_vit", 10, 8, cfg.seed), *data, backend_factory=backend_factory)


def _params_per_step(trainer: Trainer) -> list[torch.Tensor]:
    with trainer:
        return [(trainer.step(), torch.from_numpy(trainer.get_params()))[1] for _ in range(STEPS)]


@pytest.fixture(scope="module")
def reference(data) -> list[torch.Tensor]:
    """The in-process run at default settings: it computes on a 1-CPU replica's one thread (``farm.local_threads``)."""
    return _params_per_step(_trainer(data, backend="local"))


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Bit for bit: every reduction adds in task order, whatever replica ran which task when."""
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"step {step}: max diff {(g - w).abs().max().item():.3g}"


def test_params_move(reference):
    """Guards the comparisons below against a step that changes nothing."""
    assert (reference[0] - reference[-1]).abs().max() > 1e-4


@pytest.mark.parametrize("replicas", [1, 3])
def test_replicas_match_in_process(data, reference, replicas, recorded):
    trainer = _trainer(data, recorded, replicas=replicas)
    _assert_same(_params_per_step(trainer), reference)
    c = trainer.backend.counters
    assert c.accepted == c.completed == c.dispatched == trainer.backend.tasks
    assert c.restarts == c.retried == 0


def test_farm_runs_agree_whatever_replicas_speeds_and_order(data, reference):
    """The all-reduce (the LR default) on two farms that finish their tasks in other orders on other replicas:
    three replicas, one three times slower, one call each in flight; two at full speed. Each task's partial is
    kept apart and every member adds them in task order, so both are the in-process run, bit for bit (they
    once summed each replica's tasks in completion order, then the replicas' sums in float32)."""
    slow = [ReplicaOptions(), ReplicaOptions(slowdown=3.0), ReplicaOptions()]

    def uneven(cfg, model, loss_fn):
        return RayBackend(cfg, model, loss_fn, replica_options=slow)

    got = []
    for factory, farm in ((uneven, {"in_flight": 1}), (None, {"replicas": 2})):
        trainer = _trainer(data, factory, **farm)  # one at a time: the test Ray holds 4 one-CPU replicas
        got.append(_params_per_step(trainer))
        assert trainer.backend.reduction == "allreduce"
    _assert_same(got[0], got[1])
    _assert_same(got[0], reference)


def test_killed_replica_mid_step(data, reference, inject_fault, recorded):
    """A replica killed with shards in flight: they are re-dispatched, its successor re-syncs, same bits."""
    trainer = _trainer(data, recorded, reduction="driver")
    # 17 tasks a step: the kill lands among step 1's main shards, a dozen of them still to run.
    inject_fault(trainer.backend, after=22)
    _assert_same(_params_per_step(trainer), reference)
    c = trainer.backend.counters
    assert c.restarts == 1
    assert c.retried >= 1, "the kill should have caught shards in flight"
    assert c.accepted == c.completed == trainer.backend.tasks, "every task's result is accepted exactly once"
    assert c.dispatched == c.completed + c.retried


def test_allreduce_matches_driver_reduction(data, reference):
    trainer = _trainer(data, reduction="allreduce")
    _assert_same(_params_per_step(trainer), reference)
    c = trainer.backend.counters
    assert c.recomputed == 0
    # Partials stay on the replicas: only the one summed vector per step comes back as gradient.
    assert c.bytes_returned < 3 * STEPS * sum(g.size for g in trainer.groups) * 8


def test_allreduce_reports_the_cosine_between_consecutive_sums(data):
    """The driver never sees the all-reduced sums, so the replicas report each step's cosine to the last sums they
    applied: the in-process run's cosines (float64 sums; the replicas keep the last one in float32), NaN on the
    first step, which has no previous estimate."""
    cosines, norms = [], []
    for farm in ({"backend": "local"}, {"reduction": "allreduce"}):
        cfg = BASE.replace(farm=dataclasses.replace(BASE.farm, **farm))
        with Trainer(cfg, create_model("digits_vit", 10, 8, cfg.seed), *data) as trainer:
            reports = [trainer.step() for _ in range(STEPS)]
        cosines.append([r.cosine for r in reports])
        norms.append([r.grad_norm for r in reports])
    assert norms[0] == norms[1], "the members clip the in-process sum: the same norm before clipping"
    want, got = cosines
    assert all(math.isnan(c) for c in got[0] + want[0])
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w, rtol=1e-5)
        assert all(-1 <= c <= 1 for c in g)


def _kill_most_held(backend) -> None:
    work = backend.pool.work
    slot = max(backend.pool.slots, key=lambda s: len(work.held(s)))
    assert work.held(slot), "the fault should land after some partials were accepted"
    ray.kill(slot.handle, no_restart=True)


def test_allreduce_survives_a_killed_replica(data, reference, inject_fault):
    """Partial sums held by the killed replica are recomputed on the survivors before the collective."""
    trainer = _trainer(data, reduction="allreduce")
    # Which replica is busiest at a given moment is timing; the one holding the most partials is chosen.
    inject_fault(trainer.backend, after=40, action=_kill_most_held)
    _assert_same(_params_per_step(trainer), reference)
    c = trainer.backend.counters
    assert c.restarts == 1
    assert c.recomputed >= 1, "the killed replica should have held accepted partials"


def test_allreduce_recomputes_partials_lost_while_recomputing(data, reference, inject_fault):
    """A second replica dies while the first one's partials are being recomputed for the collective: its own
    partials are recomputed too before the sum (they were once left out, summing a fraction of the step)."""
    trainer = _trainer(data, reduction="allreduce")
    held: list[int] = []

    def kill_holder(busy: bool):
        def action(backend) -> None:
            # The second victim must be running recomputed tasks and hold partials of its own.
            work = backend.pool.work
            slots = [s for s in backend.pool.slots if work.in_flight(s) or not busy]
            slot = max(slots, key=lambda s: len(work.held(s)))
            assert work.held(slot), "the fault should land on a replica holding partials"
            held.append(len(work.held(slot)))
            ray.kill(slot.handle, no_restart=True)

        return action

    # Step 1's main shards run up to result 34; 35 is the first partial recomputed for its all-reduce.
    inject_fault(trainer.backend, after=30, action=kill_holder(busy=False))
    inject_fault(trainer.backend, after=35, action=kill_holder(busy=True))
    _assert_same(_params_per_step(trainer), reference)
    c = trainer.backend.counters
    assert c.restarts == 2 and len(held) == 2
    assert c.recomputed >= sum(held), "the second victim's partials should have been recomputed too"


class _Interrupted(Exception):
    pass


def test_a_failed_recompute_loses_no_partial(data, inject_fault):
    """The recompute of a dead replica's partials raises (a fault budget spent, a stall) after one of them was
    accepted: every partial accepted before the death is still held by a live replica or orphaned, once, so a
    later sum of the step recomputes the rest instead of summing a fraction of the step."""
    trainer = _trainer(data, reduction="allreduce")
    accepted: set = set()

    def kill_holder(backend) -> None:
        accepted.update(t.key for s in backend.pool.slots for t in backend.pool.work.held(s))
        _kill_most_held(backend)

    def interrupt(backend) -> None:
        # Inside the recompute: step 1's main run has returned (17 + 17 accepted), after the one death.
        assert backend.counters.accepted == 34 and backend.counters.restarts == 1
        raise _Interrupted

    # As in the test above: step 1's main shards run up to result 34, 35 is the first recomputed partial.
    inject_fault(trainer.backend, after=30, action=kill_holder)
    inject_fault(trainer.backend, after=35, action=interrupt)
    with trainer, pytest.raises(_Interrupted):
        for _ in range(STEPS):
            trainer.step()
    pool = trainer.backend.pool
    placed = [t.key for s in pool.slots for t in pool.work.held(s)] + [t.key for t in pool.work.orphans]
    assert len(placed) == len(set(placed)), "a partial is both held and orphaned, or held twice"
    assert accepted and accepted <= set(placed), f"partials lost: {sorted(accepted - set(placed))}"
    assert pool.work.orphans, "the recompute was interrupted with partials still to run"


def _kill_all(backend) -> None:
    for slot in backend.pool.slots:
        ray.kill(slot.handle, no_restart=True)


def test_every_replica_killed_at_once_resumes_from_the_snapshot(data, reference, inject_fault):
    """All three replicas die mid-step 1: the first replacement tries to adopt from a peer that is dead too
    (its export is lost), so it and the others adopt the snapshot kept after step 0; same parameters."""
    trainer = _trainer(data, reduction="allreduce")
    inject_fault(trainer.backend, after=22, action=_kill_all)
    _assert_same(_params_per_step(trainer), reference)
    c = trainer.backend.counters
    assert c.restarts == 3, "one replacement per death: a replica whose source died is re-synced, not replaced"
    assert c.state_copies >= 1, "the first replacement should have tried a (dead) live peer first"


def test_a_replica_dead_between_steps_is_replaced_when_the_parameters_are_read(data, reference):
    """A replica killed between steps (no call of its in flight): reading the parameters (a checkpoint, an
    evaluation) replaces it and reads a survivor; the run goes on with the same parameters."""
    trainer = _trainer(data)
    got = []
    with trainer:
        for step in range(STEPS):
            trainer.step()
            if step == 0:
                ray.kill(trainer.backend.pool.slots[0].handle, no_restart=True)
            got.append(torch.from_numpy(trainer.get_params()))
    _assert_same(got, reference)
    assert trainer.backend.counters.restarts == 1


def test_fractional_fake_gpu(data, reference):
    """Two replicas share the one (fake) GPU at 0.5 each; without CUDA they fall back to the CPU."""
    trainer = _trainer(data, replicas=2, num_gpus_per_replica=0.5)
    infos = trainer.backend.describe()
    assert [i.gpu_ids for i in infos] == [("0",), ("0",)]
    assert {i.device for i in infos} == {"cuda:0" if torch.cuda.is_available() else "cpu"}
    _assert_same(_params_per_step(trainer), reference)


@pytest.fixture(scope="module")
def spsa_reference(data) -> list[torch.Tensor]:
    return _params_per_step(_trainer(data, backend="local", spsa=True))


@pytest.mark.parametrize("replicas", [1, 3])
def test_scalar_protocol_matches_in_process(data, spsa_reference, replicas, recorded):
    """SPSA shards return per-draw coefficients; every replica rebuilds the step's gradient from seeds."""
    trainer = _trainer(data, recorded, spsa=True, replicas=replicas)
    assert trainer.backend.reduction == "scalar"
    _assert_same(_params_per_step(trainer), spsa_reference)
    runs = trainer.backend.runs
    assert all(r.grad is None for _, results in runs for r in results), "no gradient crosses the wire"
    assert any(r.coefs is not None for _, results in runs for r in results)
    assert (spsa_reference[0] - spsa_reference[-1]).abs().max() > 1e-4


def test_replicas_that_drift_apart_fail_loudly(data):
    """Reading the parameters (a checkpoint, an evaluation) compares every replica's digest first."""
    with _trainer(data, replicas=2) as trainer:
        trainer.step()
        state = trainer.backend.state()
        slot = trainer.backend.pool.current()[1]
        ray.get(slot.handle.adopt.remote(dataclasses.replace(state, params=state.params + 1e-3)))
        trainer.step()
        with pytest.raises(FarmError, match="drifted apart"):
            trainer.get_params()


@pytest.mark.parametrize("replicas", [1, 3])
def test_sliced_replay_matches_in_process(data, spsa_reference, replicas):
    """Each replica rebuilds a share of the step's canonical noise slices and one all-gather assembles them: the
    full replay's bits, so the in-process run's, whatever the number of replicas."""
    trainer = _trainer(data, spsa=True, replicas=replicas, replay="sliced")
    assert trainer.backend.sliced and trainer.backend.reduction == "scalar"
    _assert_same(_params_per_step(trainer), spsa_reference)
    c = trainer.backend.counters
    assert c.restarts == 0


def test_sliced_replay_survives_a_replica_killed_before_it(data, spsa_reference, inject_fault):
    """A replica killed as step 1's last shard result comes in is dead when the replay's collective opens: the
    survivors replay again with the shares re-dealt, and the replacement adopts their state."""
    trainer = _trainer(data, spsa=True, replay="sliced")
    inject_fault(trainer.backend, after=2 * 17)
    allreduce, broken = trainer.backend.allreduce, []
    recover = allreduce._recover
    allreduce._recover = lambda members, refs, cause: (broken.append(cause), recover(members, refs, cause))
    _assert_same(_params_per_step(trainer), spsa_reference)
    assert trainer.backend.counters.restarts == 1
    assert len(broken) == 1, "the dead replica should have broken one replay's collective"
