"""Allocation benchmark: does each allocator reduce the gradient's error, along a default training run?

At checkpoints of a training run of the default config (start, middle, end), on that step's batch and
parameters, every allocator estimates the batch gradient ``reps`` times with fresh noise (the same noise
for every allocator: paired repetitions) at the same total budget. Reported per checkpoint:

- ``mse_ratio[A]``: mean ``|g_hat - g|^2`` against the exact backprop gradient of the batch, divided by
  equal allocation's; below 1 means the allocation pays.
- ``oracle``: Neyman allocation from traces measured with a separate large pilot, not charged to the
  budget: the best any allocator could do from exact traces.
- ``cosine[A]``: mean cosine to the exact gradient.

Allocators are named ``kind/signal`` (``neyman/clean``: Neyman from the clean-pass proxy; ``/memory``:
from the run's per-sample trace memory; ``/pilot``: from this step's pilot, not reused).

    python jobs/bench_allocation.py --quick --out runs/bench_allocation
    ray job submit --working-dir . -- python jobs/bench_allocation.py --out runs/bench_allocation
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flops_ray.allocation.allocators import create_allocator
from flops_ray.allocation.budget import to_counts
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import AllocatorConfig, FarmConfig, TrainConfig
from flops_ray.data.arrays import batch_at, digits
from flops_ray.estimators import queries_per_draw
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models.factory import create_model
from flops_ray.models.groups import resolve_groups
from flops_ray.models.losses import cross_entropy
from flops_ray.replica.engine import QueryEngine
from flops_ray.step.checks import least_queries
from flops_ray.step.forward import ForwardStep
from flops_ray.step.local_backend import LocalBackend
from flops_ray.training.trainer import Trainer

REP_STEP = 1_000_000
"""Repetition ``r`` at checkpoint ``s`` runs as step ``REP_STEP * (r + 1) + s``: noise no training step drew."""


@dataclass(frozen=True)
class Setting:
    """One model and budget the benchmark trains and measures."""

    model: str = "digits_vit_pretrained"
    batch_size: int = 32
    queries_per_sample: int = 16


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures."""

    settings: tuple[Setting, ...] = (Setting(), Setting(batch_size=64, queries_per_sample=8), Setting("digits_vit"))
    """The first is the headline (the default config's model and budget)."""
    steps: int = 300
    """Length of each training run."""
    checkpoints: tuple[int, ...] = (0, 60, 120, 180, 240, 300)
    """Steps at which allocations are compared (the batch the step would train on)."""
    reps: int = 200
    """Paired repetitions per allocator and checkpoint."""
    allocators: tuple[str, ...] = ("bernoulli", "gaussian/clean", "neyman/pilot", "neyman/memory", "neyman/clean")
    """Compared with equal allocation (``kind/signal``)."""
    oracle_pilot: int = 64
    """Queries per sample behind the oracle's traces (not charged to the budget)."""
    seed: int = 0


QUICK = BenchConfig(settings=(Setting(),), steps=150, checkpoints=(0, 75, 150), reps=200)


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


def _allocator_config(name: str) -> AllocatorConfig:
    kind, _, signal = name.partition("/")
    return AllocatorConfig(kind=kind, signal=signal or "clean")


def _exact_gradient(cfg: TrainConfig, model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The batch's backprop gradient of every group's trainable parameters, concatenated ``(P,)``."""
    model = copy.deepcopy(model)
    params = [p for g in resolve_groups(model, cfg.groups, linear_outputs=True) for _, p in g.params]
    loss = cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double().numpy()


def _oracle_counts(cfg: TrainConfig, engine: QueryEngine, step: int, ids, losses, pilot: int) -> list[torch.Tensor]:
    """Per group, Neyman counts from traces measured with ``pilot`` extra queries per sample."""
    engine.set_batch(step, *engine.batch())
    counts = []
    for g, group in enumerate(cfg.groups):
        items = tuple(ShardItem(j, int(ids[j]), 0, pilot, float(losses[j])) for j in range(len(ids)))
        traces = engine.run(ShardTask(kind=TaskKind.PILOT, step=step, group=g, index=0, items=items)).traces
        total = group.queries_per_sample * len(ids)
        least = least_queries(cfg.estimator, cfg.allocator)
        counts.append(
            to_counts(torch.from_numpy(traces).clamp_min(0).sqrt(), total, least, queries_per_draw(cfg.estimator))
        )
    return counts


def measure(bench: BenchConfig, trainer: Trainer) -> dict:
    """Paired MSE ratios and cosines of every allocator on the batch of ``trainer``'s next step."""
    cfg, s = trainer.cfg, trainer.step_count
    ids = batch_at(len(trainer.train_set), cfg.batch_size, cfg.seed, s)
    x, y = trainer.train_set.x[ids], trainer.train_set.y[ids]
    exact = _exact_gradient(cfg, trainer.model, x, y)
    est = cfg.estimator
    engine = QueryEngine(copy.deepcopy(trainer.model), cfg.groups, est, cfg.seed)
    backend = LocalBackend(engine)
    memory = trainer.memory.state_dict()

    def forward_step(name: str, allocators) -> ForwardStep:
        alloc_cfg = dataclasses.replace(cfg.allocator, **dataclasses.asdict(_allocator_config(name)))
        mem = TraceMemory(len(cfg.groups), len(trainer.train_set), alloc_cfg.memory_decay, alloc_cfg.memory_prior)
        mem.load_state_dict(memory)
        needs_pilot = alloc_cfg.signal == "pilot"
        step_est = dataclasses.replace(est, pilot_queries=4 if needs_pilot else est.pilot_queries)
        return ForwardStep(
            backend,
            groups=cfg.groups,
            sizes=[g.size for g in trainer.groups],
            estimator=step_est,
            allocator=alloc_cfg,
            allocators=allocators,
            memory=mem,
            shard_cost=max(cfg.farm.shard_cost, 256),
            root_seed=cfg.seed,
        )

    clean = forward_step("equal", [create_allocator(AllocatorConfig("equal")) for _ in cfg.groups])
    _, report = clean(REP_STEP - 1, x, y, ids)
    oracle = _oracle_counts(cfg, engine, REP_STEP - 2, ids, report.losses, bench.oracle_pilot)
    steps = {"equal": clean, "oracle": forward_step("equal", [FixedCounts(c) for c in oracle])}
    for name in bench.allocators:
        alloc_cfg = _allocator_config(name)
        allocators = [create_allocator(dataclasses.replace(cfg.allocator, kind=alloc_cfg.kind)) for _ in cfg.groups]
        steps[name] = forward_step(name, allocators)
        if alloc_cfg.kind == "gaussian":
            # Fit lambda first, as a run would have over earlier steps, on this batch's signal (never its draws).
            for _ in range(8):
                steps[name](REP_STEP - 3, x, y, ids)
    errors = {name: [] for name in steps}
    cosines = {name: [] for name in steps}
    for r in range(bench.reps):
        for name, forward in steps.items():
            # Every repetition allocates from the run's memory, not from the repetitions before it.
            forward.memory.load_state_dict(memory)
            reduced, _ = forward(REP_STEP * (r + 1) + s, x, y, ids)
            g = np.concatenate(reduced.grads)
            errors[name].append(float(((g - exact) ** 2).sum()))
            cosines[name].append(float(g @ exact / (np.linalg.norm(g) * np.linalg.norm(exact))))
    equal = np.mean(errors["equal"])
    row = {
        "step": s,
        "mse_ratio": {name: float(np.mean(e) / equal) for name, e in errors.items() if name != "equal"},
        "cosine": {name: float(np.mean(c)) for name, c in cosines.items()},
        "train_loss": float(np.mean(report.losses)),
    }
    print(f"step {s:4d}: " + "  ".join(f"{k} {v:.3f}" for k, v in row["mse_ratio"].items()), flush=True)
    return row


def run_setting(bench: BenchConfig, setting: Setting) -> list[dict]:
    """Train the default config at ``setting`` and measure at every checkpoint."""
    base = TrainConfig()
    cfg = base.replace(
        model=setting.model,
        batch_size=setting.batch_size,
        steps=bench.steps,
        seed=bench.seed,
        groups=tuple(dataclasses.replace(g, queries_per_sample=setting.queries_per_sample) for g in base.groups),
        farm=FarmConfig(backend="local"),
    )
    model = create_model(cfg.model, cfg.data.num_classes, cfg.data.img_size, cfg.seed)
    rows = []
    with Trainer(cfg, model, digits("train"), digits("test")) as trainer:
        for s in bench.checkpoints:
            trainer.fit(s - trainer.step_count)
            rows.append(measure(bench, trainer))
    return rows


def table(checkpoints: list[dict]) -> str:
    """MSE ratios to equal allocation as a Markdown table: a row per allocator, a column per checkpoint."""
    names = list(checkpoints[0]["mse_ratio"])
    lines = [
        "| allocator | " + " | ".join(f"step {c['step']}" for c in checkpoints) + " |",
        "|---" * (len(checkpoints) + 1) + "|",
    ]
    lines += [f"| {n} | " + " | ".join(f"{c['mse_ratio'][n]:.3f}" for c in checkpoints) + " |" for n in names]
    return "\n".join(lines)


def main(bench: BenchConfig, out: Path) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    default = TrainConfig().allocator
    settings = []
    for setting in bench.settings:
        print(f"{setting}", flush=True)
        settings.append({**dataclasses.asdict(setting), "checkpoints": run_setting(bench, setting)})
    result = {
        "default_allocator": f"{default.kind}/{default.signal}",
        "checkpoints": settings[0]["checkpoints"],
        "settings": settings,
        "config": dataclasses.asdict(bench),
        "seconds": time.perf_counter() - t0,
    }
    (out / "bench_allocation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["checkpoints"]))
    print(f"wrote {out / 'bench_allocation.json'} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one model, 3 checkpoints over 150 steps (~10 min)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_allocation"), help="output directory")
    args = parser.parse_args()
    main(QUICK if args.quick else BenchConfig(), args.out)
