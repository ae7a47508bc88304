"""Allocators compared on one training step's batch: paired repetitions against the exact backprop gradient.

Every allocator estimates the batch gradient with the same noise (paired repetitions) at the same total
budget; an oracle allocates from traces measured with a large pilot that is not charged to the budget.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from flops_ray.allocation.allocators import create_allocator
from flops_ray.allocation.budget import to_counts
from flops_ray.allocation.joint import joint_counts
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import AllocatorConfig, TrainConfig
from flops_ray.data.arrays import batch_at
from flops_ray.estimators import queries_per_draw
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models.groups import resolve_groups
from flops_ray.models.losses import cross_entropy
from flops_ray.step.backend import Backend
from flops_ray.step.checks import least_queries
from flops_ray.step.forward import ForwardStep
from flops_ray.studies.local_replicas import local_backend
from flops_ray.training.trainer import Trainer

REP_STEP = 1_000_000
"""Repetition ``r`` at checkpoint ``s`` runs as step ``REP_STEP * (r + 1) + s``: noise no training step drew."""


class FixedCounts:
    """An allocator that always returns the same counts (the oracle's, computed outside the budget)."""

    needs_traces = allocates_from_traces = False

    def __init__(self, counts: torch.Tensor):
        self.counts = counts

    def allocate(self, feats, total, minimum, unit, gen):
        return self.counts

    def update(self, feats, total, minimum, gen) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state) -> None:
        pass


def allocator_config(name: str) -> AllocatorConfig:
    """The allocator a ``kind/signal`` name stands for (no signal: the clean-pass proxy); ``joint`` is Neyman over
    (group, sample) cells (``allocator.joint``)."""
    kind, _, signal = name.partition("/")
    if kind == "joint":
        return AllocatorConfig(kind="neyman", signal=signal or "clean", joint=True)
    return AllocatorConfig(kind=kind, signal=signal or "clean")


def exact_gradient(cfg: TrainConfig, model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The batch's backprop gradient of every group's trainable parameters, concatenated ``(P,)``."""
    model = copy.deepcopy(model)
    params = [p for g in resolve_groups(model, cfg.groups, linear_outputs=True) for _, p in g.params]
    loss = cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double().numpy()


def oracle_counts(
    cfg: TrainConfig, backend: Backend, step: int, batch: tuple, losses: np.ndarray, pilot: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Neyman counts from traces measured with ``pilot`` extra queries per sample of ``batch`` (``x``, ``y``,
    sample ids), run as step ``step``: per group within its budget, joint over (group, sample) cells, and the
    traces ``(B,)`` per group."""
    x, y, ids = batch
    backend.sync(step, x, y)
    least, unit = least_queries(cfg.estimator, cfg.allocator), queries_per_draw(cfg.estimator)
    traces, budgets = [], [group.queries_per_sample * len(ids) for group in cfg.groups]
    for g in range(len(cfg.groups)):
        items = tuple(ShardItem(j, int(ids[j]), 0, pilot, float(losses[j])) for j in range(len(ids)))
        task = ShardTask(kind=TaskKind.PILOT, step=step, group=g, index=0, items=items)
        traces.append(torch.from_numpy(backend.run([task])[0].traces))
    per_group = [to_counts(t.clamp_min(0).sqrt(), total, least, unit) for t, total in zip(traces, budgets)]
    return per_group, joint_counts(traces, budgets, least, unit), traces


def level_ratios(traces: list[torch.Tensor], proxies: list[np.ndarray], widths: list[float | None]) -> list:
    """Per group, its mean measured trace over its noise width times its mean clean-pass proxy: one value for every
    group where proxies times widths are on one scale (the joint allocation's premise); None without a width or
    a positive proxy (a zero-initialised head above the group passes no error down)."""
    means = [float(np.mean(p)) for p in proxies]
    return [None if w is None or not m > 0 else float(t.mean()) / (w * m) for t, m, w in zip(traces, means, widths)]


def compare_allocators(trainer: Trainer, allocators: tuple[str, ...], reps: int, oracle_pilot: int) -> dict:
    """Paired MSE ratios (to equal allocation's) and cosines to the exact gradient of every allocator, and the
    oracle's, on the batch of ``trainer``'s next step, from the run's trace memory."""
    cfg, s = trainer.cfg, trainer.step_count
    ids = batch_at(len(trainer.train_set), cfg.batch_size, cfg.seed, s)
    x, y = trainer.train_set.x[ids], trainer.train_set.y[ids]
    backend = local_backend(copy.deepcopy(trainer.model), cfg.groups, cfg.estimator, cfg.seed)
    memory = trainer.memory.state_dict()

    def forward_step(name: str, kinds: list) -> ForwardStep:
        return _forward_step(trainer, backend, memory, name, kinds)

    memory_weight = float(trainer.memory.weight.sum())
    if s > 0 and memory_weight == 0 and any(allocator_config(n).signal == "memory" for n in allocators):
        raise RuntimeError(f"step {s}: the run never fed its trace memory, so a memory row would allocate equally")
    clean = forward_step("equal", [create_allocator(AllocatorConfig("equal")) for _ in cfg.groups])
    _, report = clean(REP_STEP - 1, x, y, ids)
    oracle, joint_oracle, traces = oracle_counts(cfg, backend, REP_STEP - 2, (x, y, ids), report.losses, oracle_pilot)
    steps = {"equal": clean, "oracle": forward_step("equal", [FixedCounts(c) for c in oracle])}
    if any(allocator_config(n).joint for n in allocators):
        steps["joint_oracle"] = forward_step("equal", [FixedCounts(c) for c in joint_oracle])
    for name in allocators:
        kind = allocator_config(name).kind
        steps[name] = forward_step(
            name, [create_allocator(dataclasses.replace(cfg.allocator, kind=kind)) for _ in cfg.groups]
        )
        if kind == "gaussian":
            # Fit lambda first, as a run would have over earlier steps, on this batch's signal (never its draws).
            for _ in range(8):
                steps[name](REP_STEP - 3, x, y, ids)
    errors, cosines = _paired_repetitions(steps, memory, s, (x, y, ids), exact_gradient(cfg, trainer.model, x, y), reps)
    equal = np.mean(errors["equal"])
    return {
        "step": s,
        "mse_ratio": {name: float(np.mean(e) / equal) for name, e in errors.items() if name != "equal"},
        "cosine": {name: float(np.mean(c)) for name, c in cosines.items()},
        "train_loss": float(np.mean(report.losses)),
        "memory_weight": memory_weight,
        # The clean step allocates equally on the clean signal: its report's traces are the proxies.
        "level": [float(t.mean()) for t in traces],
        "level_ratio": level_ratios(traces, report.traces, [g.noise_width for g in trainer.groups]),
    }


def _forward_step(trainer: Trainer, backend: Backend, memory: dict, name: str, allocators: list) -> ForwardStep:
    """A forward step on ``backend`` allocating with ``allocators`` from the signal the allocator ``name`` reads,
    its trace memory a copy of the run's ``memory``."""
    cfg, est = trainer.cfg, trainer.cfg.estimator
    alloc_cfg = dataclasses.replace(cfg.allocator, **dataclasses.asdict(allocator_config(name)))
    mem = TraceMemory(len(cfg.groups), len(trainer.train_set), alloc_cfg.memory_decay, alloc_cfg.memory_prior)
    mem.load_state_dict(memory)
    needs_pilot = alloc_cfg.signal == "pilot"
    return ForwardStep(
        backend,
        groups=cfg.groups,
        sizes=[g.size for g in trainer.groups],
        widths=[g.noise_width for g in trainer.groups],
        estimator=dataclasses.replace(est, pilot_queries=4 if needs_pilot else est.pilot_queries),
        allocator=alloc_cfg,
        allocators=allocators,
        memory=mem,
        shard_cost=max(cfg.farm.shard_cost, 256),
        root_seed=cfg.seed,
    )


def _paired_repetitions(
    steps: dict[str, ForwardStep], memory: dict, s: int, batch: tuple, exact: np.ndarray, reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per step's name, the squared errors and cosines to ``exact`` of ``reps`` estimates, every name's
    repetition ``r`` drawing the same noise."""
    errors: dict[str, list[float]] = {name: [] for name in steps}
    cosines: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(reps):
        for name, forward in steps.items():
            # Every repetition allocates from the run's memory, not from the repetitions before it.
            forward.memory.load_state_dict(memory)
            reduced, _ = forward(REP_STEP * (r + 1) + s, *batch)
            g = np.concatenate(reduced.grads)
            errors[name].append(float(((g - exact) ** 2).sum()))
            cosines[name].append(float(g @ exact / (np.linalg.norm(g) * np.linalg.norm(exact))))
    return errors, cosines
