"""The single-process trainer: budgets spent exactly, deterministic, and it learns."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from flops_ray.allocation.allocators import EqualAllocator
from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, GroupConfig, TrainConfig
from flops_ray.messages import TaskKind
from flops_ray.models.factory import create_model
from flops_ray.models.losses import cross_entropy
from flops_ray.step.local_backend import LocalBackend
from flops_ray.training.trainer import Trainer, default_backend

HEAD = (GroupConfig("head", ("head",), sigma=0.1, queries_per_sample=8),)


@pytest.fixture(scope="module")
def data(digits_splits):
    return digits_splits


def _trainer(data, backend_factory=None, **kw) -> Trainer:
    cfg = TrainConfig(**{"groups": HEAD, "batch_size": 16, "steps": 4, "lr": 5e-3, **kw})
    model = create_model("digits_vit_pretrained", 10, 8, cfg.seed, pretrain_steps=150)
    return Trainer(cfg, model, *data, backend_factory=backend_factory)


@pytest.mark.parametrize("alloc", ["equal", "bernoulli", "gaussian", "neyman"])
def test_step_spends_exactly_the_budget(data, alloc):
    """Pilot queries are reused: forwards run = sum over groups of queries_per_sample x B, no more."""
    tr = _trainer(data, allocator=AllocatorConfig(kind=alloc, gaussian_iters=3))
    log = tr.step()
    assert log.queries == 8 * 16
    assert sum(int(c.sum()) for c in log.counts) == 8 * 16
    assert all((c >= 4).all() for c in log.counts)


def test_mezo_spends_one_pair_per_sample(data):
    """MeZO: SPSA with one antithetic pair per data point and group, equally allocated."""
    tr = _trainer(
        data,
        groups=(dataclasses.replace(HEAD[0], queries_per_sample=2),),
        estimator=EstimatorConfig(kind="spsa", pilot_queries=2),
        allocator=AllocatorConfig(kind="equal"),
    )
    before = torch.from_numpy(tr.get_params())
    log = tr.step()
    assert log.queries == 2 * 16 and (log.counts[0] == 2).all()
    assert log.variance_ratio == [1.0], "equal allocation is predicted to be exactly equal's variance"
    assert not torch.equal(torch.from_numpy(tr.get_params()), before)


def test_pilot_shards_never_split_a_sample(data):
    """A 6-query pilot with 16-query shards: each trace the allocation reads still comes from all of its
    sample's draws."""
    kw = {
        "estimator": EstimatorConfig(kind="spsa", pilot_queries=6),
        "allocator": AllocatorConfig(kind="neyman", signal="pilot"),
    }
    small = _trainer(data, farm=FarmConfig(shard_cost=16), **kw).step()
    whole = _trainer(data, farm=FarmConfig(shard_cost=1024), **kw).step()
    assert np.isfinite(small.traces[0]).all()
    np.testing.assert_allclose(small.traces[0], whole.traces[0], rtol=1e-5)


def test_same_seed_same_parameters(data):
    a, b = _trainer(data), _trainer(data)
    a.fit(3)
    b.fit(3)
    assert torch.equal(torch.from_numpy(a.get_params()), torch.from_numpy(b.get_params()))
    c = _trainer(data, seed=1)
    c.fit(3)
    assert not torch.equal(torch.from_numpy(a.get_params()), torch.from_numpy(c.get_params()))


@pytest.mark.parametrize(("estimator", "bar"), [("lr", 0.3), ("spsa", 0.2), ("backprop", 0.3)])
def test_training_beats_chance(data, estimator, bar):
    """40 steps on the head of a ViT pretrained on digits 0-4: well above 10% on all ten digits.

    The fresh head starts at chance; on 360 test images a binomial sd at 0.1 is 0.016, so 0.2 is 6 sd and
    0.3 is 12 sd above it. SPSA learns slowest (0.23-0.35 after 40 steps over seeds 0-3), hence its bar.
    """
    kind = {"estimator": EstimatorConfig(kind=estimator)} if estimator != "backprop" else {"backprop": True}
    tr = _trainer(data, **kind, allocator=AllocatorConfig(kind="neyman"))
    assert tr.evaluate() < 0.2
    tr.fit(40)
    assert tr.evaluate() > bar


class _FailingQueries(LocalBackend):
    """A backend whose main queries fail (a lost node, say) once the step's allocator fit has finished."""

    fail = False
    forward_step = None

    def run(self, tasks):
        if self.fail and tasks[0].kind == TaskKind.MAIN:
            self.forward_step.fit._pending.result()
            raise RuntimeError("replicas lost")
        return super().run(tasks)


def test_a_failed_step_keeps_the_allocator_state(data):
    """The Gaussian fit overlaps the queries; when they fail, the step's fit must not survive it, even when it
    finished first."""
    backends = []

    def factory(cfg, model, loss_fn):
        inner = default_backend(cfg, model, loss_fn)
        backends.append(_FailingQueries(inner.replica, inner.threads))
        return backends[0]

    gaussian = {"allocator": AllocatorConfig(kind="gaussian", gaussian_iters=3)}
    tr = _trainer(data, factory, **gaussian)
    ref = _trainer(data, **gaussian)
    backends[0].forward_step = tr.forward_step
    tr.step()
    ref.step()
    before = tr.state_dict().allocators[0]["lambda"]
    backends[0].fail = True
    with pytest.raises(RuntimeError, match="replicas lost"):
        tr.step()
    assert torch.equal(tr.state_dict().allocators[0]["lambda"], before)
    backends[0].fail = False
    tr.fit(1)
    ref.fit(1)
    # The fit did move lambda, and the retried step is the step a run without the failure takes.
    assert not torch.equal(tr.state_dict().allocators[0]["lambda"], before)
    assert torch.equal(torch.from_numpy(tr.get_params()), torch.from_numpy(ref.get_params()))


class _MainRoundFlag(LocalBackend):
    """Sets ``done`` once a step's main queries have all run."""

    done = threading.Event()

    def run(self, tasks):
        results = super().run(tasks)
        if tasks and tasks[0].kind == TaskKind.MAIN:
            self.done.set()
        return results


class _FitAfterTheQueries(EqualAllocator):
    """Equal allocation whose fit counts itself, but only once the step's main queries are done."""

    def __init__(self, done: threading.Event):
        self.done, self.fits = done, 0

    def update(self, feats, total, minimum, gen) -> None:
        # A deadline stops a hang: a fit run before the queries instead of beside them waits here in vain.
        if not self.done.wait(60):
            raise TimeoutError("the fit ran before the step's queries, not beside them")
        self.fits += 1

    def state_dict(self):
        return {"fits": torch.tensor(self.fits)}

    def load_state_dict(self, state):
        self.fits = int(state["fits"])


def test_the_allocator_fit_runs_beside_the_queries_and_the_next_step_adopts_it(data):
    """The step's fit (on a copy, in a thread) can only finish after the step's main queries have run; the
    step returns without it, and the next allocation, or a read of the state, adopts it."""
    backends = []

    def factory(cfg, model, loss_fn):
        inner = default_backend(cfg, model, loss_fn)
        backends.append(_MainRoundFlag(inner.replica, inner.threads))
        return backends[0]

    tr = _trainer(data, factory)
    tr.allocators[0] = allocator = _FitAfterTheQueries(_MainRoundFlag.done)
    tr.step()
    assert allocator.fits == 0, "the step's fit is adopted by the next step, not by the step itself"
    report = tr.step()
    assert allocator.fits == 1 and report.fit_seconds > 0
    assert int(tr.state_dict().allocators[0]["fits"]) == 2


class _FailingFit(EqualAllocator):
    def update(self, feats, total, minimum, gen) -> None:
        raise ValueError("the fit broke")


def test_a_failed_fit_fails_the_step_that_would_adopt_it_once(data):
    """A fit raising in its thread fails the next step (not applied), naming the fit's step; the state stays
    the one before the fit, checkpointable, and the step then runs."""
    tr = _trainer(data)
    tr.allocators[0] = _FailingFit()
    tr.step()
    with pytest.raises(ValueError, match="the fit broke") as info:
        tr.step()
    assert "allocator fit of step 0" in " ".join(info.value.__notes__)
    assert tr.step_count == 1 and tr.consistent
    tr.state_dict()
    tr.allocators[0] = EqualAllocator()
    assert tr.step().step == 1


@pytest.mark.parametrize(("local_threads", "cpus", "want"), [(0, 1.0, 1), (0, 3.0, 3), (2, 1.0, 2)])
def test_in_process_queries_run_on_a_replicas_thread_count(data, local_threads, cpus, want):
    """A CPU's float32 products round by their thread count, so the in-process step computes on the threads a
    farm replica of the same config has (``farm.local_threads=0``) unless told otherwise; the count outside
    the step is left as it was."""
    seen = []

    def loss(logits, y):
        seen.append(torch.get_num_threads())
        return cross_entropy(logits, y)

    farm = FarmConfig(local_threads=local_threads, num_cpus_per_replica=cpus)
    cfg = TrainConfig(groups=HEAD, batch_size=16, steps=1, farm=farm)
    before = torch.get_num_threads()
    with Trainer(cfg, create_model("digits_vit", 10, 8, cfg.seed), *data, loss_fn=loss) as trainer:
        trainer.step()
    assert seen and set(seen) == {want}
    assert torch.get_num_threads() == before
