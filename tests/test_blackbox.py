"""Black-box losses: same estimate as the white-box path, one call per shard chunk, clear errors, skip policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flops_ray.config import AllocatorConfig, EstimatorConfig, GroupConfig, TrainConfig
from flops_ray.data.arrays import ArrayDataset
from flops_ray.models.blackbox import BlackBox, BlackBoxError, BlackBoxShapeError, ModuleLoss
from flops_ray.models.losses import cross_entropy
from flops_ray.replica.engine import NonFiniteLossError
from flops_ray.training.trainer import Trainer

GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 5, generator=GEN)
Y = (X[:, 0] > 0).long()
DATA = ArrayDataset(X.numpy(), Y.numpy())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))


def _cfg(groups, **est) -> TrainConfig:
    return TrainConfig(
        groups=groups,
        estimator=EstimatorConfig(kind=est.pop("kind", "spsa"), **est),
        # A black box offers no clean-pass proxy: both paths allocate from the trace memory of earlier steps.
        allocator=AllocatorConfig(kind="neyman", signal="memory"),
        batch_size=16,
        lr=1e-2,
    )


def _box(fn=None, **kw) -> BlackBox:
    mlp = _mlp()
    loss = ModuleLoss(mlp, cross_entropy)
    return BlackBox(fn or loss, loss.theta0(), **kw)


@pytest.mark.parametrize("kind", ["spsa", "es"])
def test_module_as_black_box_matches_white_box(kind):
    """A module behind ``ModuleLoss`` gets the same losses, hence the same step, as the model path (same seeds)."""
    white = Trainer(_cfg((GroupConfig("all", ("0", "2"), 0.01, 8),), kind=kind), _mlp(), DATA)
    black = Trainer(_cfg((BlackBox.group(0.01, 8, name="all"),), kind=kind), _box(), DATA)
    for _ in range(3):
        a, b = white.step(), black.step()
        assert a.queries == b.queries and np.array_equal(a.counts[0], b.counts[0])
    # The white box trains theta; the black box trains u with theta = theta0 + u.
    assert torch.allclose(torch.from_numpy(white.get_params()), black.model.theta(), atol=1e-5)
    assert (torch.from_numpy(white.get_params()) - ModuleLoss(_mlp(), cross_entropy).theta0()).abs().max() > 1e-3


def test_one_call_per_shard_chunk():
    """The user's function sees many parameter vectors per call: calls = shard chunks, far fewer than queries."""
    calls = []
    inner = ModuleLoss(_mlp(), cross_entropy)

    def counted(thetas, x, y):
        calls.append(len(thetas))
        return inner(thetas, x, y)

    tr = Trainer(_cfg((BlackBox.group(0.01, 8),)), _box(counted), DATA)
    log = tr.step()
    # 1 clean call, then main shards of at most shard_cost (64) rows each.
    assert sum(calls) == log.queries + 16
    assert len(calls) <= 1 + int(np.ceil(log.queries / 64)) + 1
    assert max(calls) > 8


@pytest.mark.parametrize("kind", ["spsa", "lr"])
def test_subspace_projects_a_fixed_matrix(kind):
    """SPSA perturbs u, LR perturbs theta = theta0 + u W and maps its estimate back through W: either way theta
    moves only inside the span of W's rows."""
    a, b = _box(subspace=4, seed=3), _box(subspace=4, seed=3)
    assert a.search.value.shape == (4,) and torch.equal(a.projection, b.projection)
    tr = Trainer(_cfg((BlackBox.group(0.05, 8),), kind=kind), a, DATA)
    tr.fit(3)
    # theta moves only inside the span of W's rows.
    delta = a.theta() - a.theta0
    resid = delta - torch.linalg.lstsq(a.projection.T, delta[:, None]).solution[:, 0] @ a.projection
    assert delta.norm() > 0 and resid.norm() < 1e-4 * delta.norm()


def _poisoned(bad_sample: int, how: str):
    inner = ModuleLoss(_mlp(), cross_entropy)

    def fn(thetas, x, y):
        out = inner(thetas, x, y)
        hit = (x[:, 1] == X[bad_sample, 1]).nonzero().flatten()
        perturbed = thetas.shape[0] == 0 or not torch.equal(thetas, thetas[:1].expand_as(thetas))
        if len(hit) and perturbed:
            if how == "raise":
                raise KeyError("backend unavailable")
            if how == "shape":
                return out[:-1]
            out = out.clone()
            out[hit] = float("nan")
        return out

    return fn


def _batch_sample(tr: Trainer) -> int:
    from flops_ray.data.arrays import batch_at

    return int(batch_at(len(DATA), tr.cfg.batch_size, tr.cfg.seed, tr.step_count)[3])


@pytest.mark.parametrize(
    ("how", "error", "pattern"),
    [
        ("nan", NonFiniteLossError, r"shard \(0, 0, '\w+', \d+\): loss is nan for batch row \d+ \(sample {s};"),
        (
            "raise",
            BlackBoxError,
            r"shard \(0, 0, '\w+', \d+\), samples \[.*\b{s}\b.*\]: the loss function raised KeyError",
        ),
        ("shape", BlackBoxShapeError, r"samples \[.*\b{s}\b.*\]: the loss function returned shape \(\d+,\), expected"),
    ],
)
def test_bad_losses_name_shard_and_sample(how, error, pattern):
    probe = Trainer(_cfg((BlackBox.group(0.01, 8),)), _box(), DATA)
    bad = _batch_sample(probe)
    tr = Trainer(_cfg((BlackBox.group(0.01, 8),)), _box(_poisoned(bad, how)), DATA)
    before = torch.from_numpy(tr.get_params())
    with pytest.raises(error, match=pattern.format(s=bad)):
        tr.step()
    # Nothing was applied: the optimizer never stepped, the step counter did not move.
    assert torch.equal(torch.from_numpy(tr.get_params()), before) and tr.step_count == 0


@pytest.mark.parametrize("how", ["nan", "raise"])
def test_skip_policy_counts_and_keeps_the_step_finite(how):
    probe = Trainer(_cfg((BlackBox.group(0.01, 8),)), _box(), DATA)
    bad = _batch_sample(probe)
    # Chunks of 8 rows: a call that raises drops only its own rows.
    cfg = _cfg((BlackBox.group(0.01, 8),), on_nonfinite="skip", max_rows=8)
    tr = Trainer(cfg, _box(_poisoned(bad, how)), DATA)
    log = tr.step()
    if how == "nan":
        assert log.skipped == log.counts[0][3]  # exactly the poisoned sample's queries
    assert log.counts[0][3] <= log.skipped < log.queries
    assert torch.isfinite(torch.from_numpy(tr.get_params())).all() and tr.step_count == 1


def test_skip_policy_still_raises_on_a_wrong_shape():
    """A wrong output shape is a bug in the function, not a bad query: skipping it would hide it."""
    probe = Trainer(_cfg((BlackBox.group(0.01, 8),)), _box(), DATA)
    bad = _batch_sample(probe)
    tr = Trainer(_cfg((BlackBox.group(0.01, 8),), on_nonfinite="skip"), _box(_poisoned(bad, "shape")), DATA)
    with pytest.raises(BlackBoxShapeError, match="returned shape"):
        tr.step()


def test_theta0_is_copied_and_integer_inputs_keep_their_dtype():
    """A box owns its start (the caller's tensor may change); token ids reach the function as integers."""
    table_rows = torch.zeros(10)
    tokens = torch.randint(0, 10, (64, 3), generator=torch.Generator().manual_seed(1))
    target = (tokens.sum(1) % 3).numpy()

    def lookup(thetas, x, y):
        return (thetas.gather(1, x).sum(1) - y) ** 2

    box = BlackBox(lookup, table_rows)
    table_rows += 1
    assert torch.equal(box.theta0, torch.zeros(10))
    cfg = _cfg((BlackBox.group(0.05, 8),), kind="es").replace(lr=0.05)
    tr = Trainer(cfg, box, ArrayDataset(tokens.numpy(), target))
    first = tr.step().loss
    logs = tr.fit(30)
    assert np.mean([log.loss for log in logs[-5:]]) < 0.5 * first


def test_failed_step_leaves_the_checkpoint_intact(tmp_path):
    """A bad loss at step 1 raises; the checkpoint of step 1 is untouched and resumes the run."""
    from flops_ray.data.arrays import batch_at

    cfg = _cfg((BlackBox.group(0.01, 8),))
    bad = int(batch_at(len(DATA), cfg.batch_size, cfg.seed, 1)[3])
    tr = Trainer(cfg, _box(_poisoned(bad, "nan")), DATA)
    tr.step()
    path = tr.save(tmp_path / "checkpoint.safetensors")
    saved = path.read_bytes()
    with pytest.raises(NonFiniteLossError, match=f"sample {bad};"):
        tr.step()
    assert path.read_bytes() == saved
    resumed = Trainer(cfg, _box(_poisoned(bad, "nan")), DATA)
    assert resumed.resume(path) == 1
    assert torch.equal(torch.from_numpy(resumed.get_params()), torch.from_numpy(tr.get_params()))


def test_integer_losses_are_refused():
    """Integer or boolean losses quantise every difference the estimate is made of: an error, never skipped."""
    box = BlackBox(lambda thetas, x, y: (thetas.sum(-1) > 0).long(), torch.zeros(3))
    with pytest.raises(BlackBoxShapeError, match="int64 losses; return floating-point losses"):
        box.losses(torch.zeros(4, 3), torch.ones(4, 3), torch.ones(4))


@pytest.mark.parametrize("inference", [False, True])
def test_a_box_may_record_autograd_unless_it_opts_into_inference_mode(inference):
    """By default the box runs under ``no_grad``, so a function may differentiate inside (``enable_grad``);
    ``inference=True`` runs it under ``inference_mode``, where the same function cannot."""
    inner = ModuleLoss(_mlp(), cross_entropy)
    modes = []

    def differentiating(thetas, x, y):
        modes.append(torch.is_inference_mode_enabled())
        with torch.enable_grad():
            t = thetas.detach().requires_grad_()
            (grad,) = torch.autograd.grad(inner(t, x, y).sum(), t)  # e.g. an inner step on the parameters
        return inner(thetas - 1e-3 * grad, x, y)

    tr = Trainer(_cfg((BlackBox.group(0.01, 8),)), _box(differentiating, inference=inference), DATA)
    if inference:
        with pytest.raises(BlackBoxError, match="the loss function raised RuntimeError"):
            tr.step()
    else:
        assert np.isfinite(tr.step().loss)
    assert modes and all(m == inference for m in modes)
