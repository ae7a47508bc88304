"""Scale-out benchmark: bytes per step against ``P``, and a step-time model checked here, then run to 256 GPUs.

- ``driver_bytes_per_step[kind]``: bytes the driver sends and receives in one training step on a real local
  farm (2 replicas), for MLPs of growing width on the digits (``P`` over 100x); ``es`` uses the scalar
  protocol (per-draw coefficients), ``lr`` the all-reduce. Parameters never cross the driver, so neither grows
  with ``P``.
- ``replica_bytes_per_step[kind]``: what each replica sends and receives: its share of the driver's messages
  plus, for LR, its part of the float32 ring all-reduce ``2 (n-1)/n x 4P`` (computed: the collective's
  traffic does not pass through Ray).
- ``validation``: the step-time model (:mod:`flops_ray.studies.step_time`) fed with costs measured here (call
  latency, engine seconds per query, driver seconds per step, optimizer and replay seconds, each measured
  right before its farm runs) predicts the step time of real local farms of 1-3 replicas of the digits ViT;
  ``error`` is ``|predicted - measured| / measured``.
- ``simulated_efficiency``: the same model for ViT-B/16 at the paper's budget (``B = 128``, 20 queries per
  sample and group, 4 groups, ``P = 86 M``) on ``n`` GPUs, with the per-query costs measured on an H100
  (``docs/results/bench_engine_cuda.json``), the network and optimizer assumptions in ``assumptions``, and
  the driver's costs measured here (its seconds per step at the shipped ViT-B/16 config's step shape).

    python jobs/bench_scale.py --quick --out runs/bench_scale
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn

from flops_ray.allocation.allocators import AllocationFeatures, create_allocator
from flops_ray.allocation.gaussian import GaussianAllocator
from flops_ray.app.job_config import load_config
from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, GroupConfig, TrainConfig
from flops_ray.data.arrays import digits
from flops_ray.estimators import RowPlan, queries_per_draw
from flops_ray.estimators.noise import NoiseLayout
from flops_ray.farm.costs import call_costs
from flops_ray.farm.ray_init import init_ray
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models.factory import create_model
from flops_ray.replica.replay import replay_gradients
from flops_ray.step.checks import least_queries
from flops_ray.step.local_backend import LocalBackend
from flops_ray.studies.step_time import Costs, Workload, step_time
from flops_ray.training.trainer import Trainer, default_backend

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ScaleConfig:
    """What the benchmark measures."""

    widths: tuple[int, ...] = (16, 64, 400)
    """Hidden widths of the MLP family behind the bytes figures (``P`` from 1.5 k to 190 k)."""
    wire_workers: int = 2
    """Replicas of the bytes figures."""
    wire_steps: int = 2
    """Steps averaged per bytes figure (after one warm-up step)."""
    batch_size: int = 32
    """Samples per step of the local runs."""
    queries_per_sample: int = 16
    """Queries per sample and group of the local runs."""
    shard_cost: int = 64
    """Forward passes per shard of the local runs."""
    validate_queries: int = 64
    """Queries per sample and group of the step-time check (steps of ~1 s on one core: compute-dominated, as
    a GPU farm's steps are)."""
    validate_workers: tuple[int, ...] = (1, 2, 3)
    """Replica counts of the local step-time check."""
    validate_steps: int = 8
    """Timed steps per replica count (after one warm-up step)."""
    gpus: tuple[int, ...] = (8, 16, 64, 256)
    """GPU counts of the simulated efficiency."""
    reps: int = 3
    """Repetitions of the cost measurements (the best is kept)."""
    seed: int = 0


QUICK = ScaleConfig(reps=2)

# The stated GPU cluster of the simulation (not measured here): DGX H100-class nodes.
ASSUMPTIONS = {
    "link_bytes_per_s": 50e9,
    "link_latency_s": 20e-6,
    "driver_bytes_per_s": 12.5e9,
    "hbm_bytes_per_s": 3.0e12,
    "adam_bytes_per_param": 28,
    "replay_flops_per_s": 5e13,
    "note": "8 GPUs per node with one 400 Gb/s NIC each (50 GB/s per GPU in the ring), a 100 Gb/s link out of "
    "the driver; Adam reads param, grad and two moments and writes three (28 B/param at 3 TB/s HBM); replay "
    "weighs each regenerated number at tensor-core rate (2 flops at 50 TFLOP/s); per-query engine costs are "
    "the H100 float32 figures of bench_engine (docs/results/bench_engine_cuda.json); one farm.shard_cost for "
    "the main round and one farm.clean_shard for the clean pass, those (8 to 256 forwards, 1 to 128 samples) "
    "the model finds fastest on n GPUs; the driver's call, task and per-step seconds are measured here (per "
    "step: the shipped ViT-B/16 config's step shape, planned and allocated on the driver); its allocator fit, "
    "timed alone on one thread here, runs in a driver thread with a core of its own from the main round to "
    "the next step's allocation",
}
VIT_B = {"batch": 128, "queries_per_sample": 20, "groups": 4, "pilot": 4, "params": 86_000_000}
VIT_B_MAIN_SHARD = 32
"""Forwards per main shard of the ViT-B step for the driver's planning cost: 5 shards per GPU at 64 GPUs, more
tasks to plan than the sizes the model picks there (conservative)."""


def mlp(width: int) -> nn.Module:
    """The MLP family of the bytes figures: 64 digit pixels -> width -> width -> 10."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


MLP_GROUPS = (GroupConfig("mlp", ("1", "3", "5"), sigma=0.01, queries_per_sample=16),)


def _config(bench: ScaleConfig, kind: str, workers: int, groups=MLP_GROUPS, model: str = "mlp") -> TrainConfig:
    q = bench.queries_per_sample if model == "mlp" else bench.validate_queries
    groups = tuple(GroupConfig(g.name, g.modules, g.sigma, q) for g in groups)
    return TrainConfig(
        model=model,
        batch_size=bench.batch_size,
        groups=groups,
        estimator=EstimatorConfig(kind=kind),
        allocator=AllocatorConfig(kind="neyman", signal="memory"),
        farm=FarmConfig(backend="ray", workers=workers, shard_cost=bench.shard_cost, num_cpus_per_worker=1),
        seed=bench.seed,
    )


def _bytes(trainer: Trainer) -> int:
    c = trainer.backend.counters
    return c.bytes_sent + c.bytes_returned


def wire(bench: ScaleConfig, kind: str) -> dict:
    """Driver and replica bytes per step at every width (a real local farm of ``wire_workers`` replicas)."""
    train = digits("train")
    out = {"P": [], "driver": [], "replica": []}
    n = bench.wire_workers
    for width in bench.widths:
        with Trainer(_config(bench, kind, n), mlp(width), train) as trainer:
            trainer.step()
            before = _bytes(trainer)
            trainer.fit(bench.wire_steps)
            driver = (_bytes(trainer) - before) / bench.wire_steps
            p = sum(g.size for g in trainer.groups)
        ring = 2 * (n - 1) / n * 4 * p if kind == "lr" else 0.0
        out["P"].append(p)
        out["driver"].append(driver)
        out["replica"].append(driver / n + ring)
        print(
            f"{kind} P={p:,}: driver {driver / 1e3:.1f} kB/step, replica {(driver / n + ring) / 1e3:.1f} kB", flush=True
        )
    return out


class _TimedLocal(LocalBackend):
    """The in-process backend, timing its replica's work (shards; the reduction and the update, which a farm's
    replicas do) apart from the driver's."""

    engine_s = apply_s = 0.0
    forwards = 0

    def run(self, tasks):
        t0 = time.perf_counter()
        results = super().run(tasks)
        self.engine_s += time.perf_counter() - t0
        self.forwards += sum(r.forwards for r in results)
        return results

    def reduce(self, tasks, results, sizes):
        t0 = time.perf_counter()
        reduced = super().reduce(tasks, results, sizes)
        self.apply_s += time.perf_counter() - t0
        return reduced

    def apply(self):
        t0 = time.perf_counter()
        super().apply()
        self.apply_s += time.perf_counter() - t0


def task_overhead(bench: ScaleConfig, kind: str, calls: int = 200) -> float:
    """Seconds per shard call on a 1-replica farm beyond the replica's own work on it: tiny shards (one sample,
    one pair of queries), the farm's wall time minus the replica's busy time over the same calls, per call
    (both timed in one run, so a host whose speed drifts moves them together)."""
    cfg = _config(bench, kind, 1, groups=_vit_groups(), model="digits_vit")
    x, y = digits("train").x[: bench.batch_size], digits("train").y[: bench.batch_size]
    tasks = [ShardTask(TaskKind.MAIN, 0, 0, i, (ShardItem(i % len(y), i, 0, 2),), weights=(1.0,)) for i in range(calls)]
    with Trainer(cfg, create_model("digits_vit", 10, 8, bench.seed), digits("train")) as tr:
        tr.backend.sync(0, x, y)
        tr.backend.run(tasks[:10])
        handle = tr.backend.pool.slots[0].handle
        before = ray.get(handle.stats.remote()).busy_seconds
        t0 = time.perf_counter()
        tr.backend.run(tasks)
        farm = time.perf_counter() - t0
        busy = ray.get(handle.stats.remote()).busy_seconds - before
    return max(0.0, (farm - busy) / calls)


@dataclass(frozen=True)
class _Timed:
    """Per-step seconds of in-process steps, split into the replica's part and the driver's own, and the
    allocator fit's (in its thread, apart)."""

    step_s: float
    engine_s: float
    apply_s: float
    fit_s: float
    forwards: float
    sizes: list[int]

    @property
    def driver_s(self) -> float:
        return self.step_s - self.engine_s - self.apply_s


class LocalSteps(contextlib.AbstractContextManager):
    """In-process steps of the digits ViT under ``cfg`` on one thread (after one warm-up step), taken one at a
    time, so they can be interleaved with a farm's: the replica's part (shards, reduction, update) timed
    apart from the driver's own, and the allocator fit's."""

    def __init__(self, cfg: TrainConfig, seed: int):
        backends: list[_TimedLocal] = []

        def factory(c, model, loss_fn):
            engine = default_backend(c.replace(farm=FarmConfig()), model, loss_fn).engine
            backends.append(_TimedLocal(engine, c.update_rule))
            return backends[0]

        torch.set_num_threads(1)
        self.trainer = Trainer(cfg, create_model("digits_vit", 10, 8, seed), digits("train"), backend_factory=factory)
        self.trainer.step()
        self.backend = backends[0]
        self.backend.engine_s = self.backend.apply_s = self.backend.forwards = 0
        self.steps, self.step_s, self.fit_s = 0, 0.0, 0.0

    def step(self) -> None:
        # The fit of the step before runs on into this one: waited for here, so a step's time is its own.
        self.fit_s += self.trainer.forward_step.fit.settle()
        self.step_s += self.trainer.step().seconds
        self.steps += 1

    def timed(self) -> _Timed:
        b, n = self.backend, self.steps
        sizes = [g.size for g in self.trainer.groups]
        return _Timed(self.step_s / n, b.engine_s / n, b.apply_s / n, self.fit_s / n, b.forwards / n, sizes)

    def __exit__(self, *exc) -> None:
        self.trainer.close()


def timed_steps(cfg: TrainConfig, steps: int, seed: int) -> _Timed:
    """``steps`` in-process steps of the digits ViT under ``cfg`` (after one warm-up step), one thread."""
    with LocalSteps(cfg, seed) as local:
        for _ in range(steps):
            local.step()
        return local.timed()


def costs_of(t: _Timed, call_s: float, task_s: float, replay_s: float) -> Costs:
    """A replica thread's and the driver's costs from in-process steps ``t``, with the farm's own per-call
    costs and the seconds per replayed noise number."""
    p = sum(t.sizes)
    return Costs(
        query_s=t.engine_s / t.forwards,
        call_s=call_s,
        driver_s=t.driver_s,
        fit_s=t.fit_s,
        task_s=task_s,
        link_bytes_per_s=1e9,
        apply_s_per_param=t.apply_s / p,
        replay_s_per_number=replay_s,
        cores=os.cpu_count() or 1,
    )


def vit_b_driver_seconds(bench: ScaleConfig) -> tuple[float, float]:
    """Driver seconds per step of the shipped ViT-B/16 config's step (batch, groups, queries, estimator,
    allocator; main shards of the 64-GPU size), measured here on the digits ViT: planning and allocation
    depend on the step's shape, not on the model, whose forwards are timed apart and left out, except for
    the batch's cosine distances, whose cost at ViT-B's embedding width is measured apart and added.

    Returns:
        The driver's own seconds, and the allocator fit's alone on one thread (:func:`fit_seconds`).
    """
    vit, _ = load_config(ROOT / "jobs/configs/vit_b16_cifar100.yaml")
    blocks = (("blocks.0.*",), ("blocks.1.*",), ("blocks.[2-3].*",), ("head",))
    groups = tuple(dataclasses.replace(g, modules=m) for g, m in zip(vit.groups, blocks))
    cfg = _config(bench, "lr", 1, groups=groups, model="digits_vit").replace(
        batch_size=vit.batch_size,
        groups=groups,
        estimator=vit.estimator,
        allocator=vit.allocator,
        farm=FarmConfig(shard_cost=VIT_B_MAIN_SHARD),
    )
    t = timed_steps(cfg, 2, bench.seed)
    narrow = create_model("digits_vit", 10, 8, bench.seed).embed_dim
    return t.driver_s + wider_embeddings_seconds(cfg.batch_size, narrow, 768), fit_seconds(cfg, bench.reps)


def wider_embeddings_seconds(b: int, narrow: int, wide: int, reps: int = 50) -> float:
    """Seconds the step's one ``(B, B)`` cosine-distance matrix (the driver's only work that grows with the
    model's width) costs more from ``(B, wide)`` embeddings than from ``(B, narrow)`` ones (best of ``reps``)."""

    def best(width: int) -> float:
        e = torch.randn(b, width, dtype=torch.float64)
        seconds = []
        for _ in range(reps):
            fresh = e.clone()  # a new tensor: the last batch's matrix is not reused
            t0 = time.perf_counter()
            GaussianAllocator.distances(fresh)
            seconds.append(time.perf_counter() - t0)
        return min(seconds)

    return max(0.0, best(wide) - best(narrow))


def fit_seconds(cfg: TrainConfig, reps: int, width: int = 768) -> float:
    """Seconds of one step's allocator fit under ``cfg`` (every group's), alone on one thread: on a farm it runs
    in a thread of the driver beside a dispatch loop that mostly waits on Ray, not beside an in-process engine
    as in :func:`timed_steps`. Its cost depends on the batch, the groups and the allocator's settings, not on the
    features' values (``width``: the embeddings', ViT-B's by default). Best of ``reps``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    b = cfg.batch_size
    feats = AllocationFeatures(
        torch.rand(b, generator=gen, dtype=torch.float64) + 0.1,
        torch.rand(b, generator=gen, dtype=torch.float64),
        torch.randn(b, width, generator=gen, dtype=torch.float64),
    )
    minimum = least_queries(cfg.estimator, cfg.allocator)
    best = math.inf
    for _ in range(reps):
        allocators = [create_allocator(cfg.allocator) for _ in cfg.groups]
        t0 = time.perf_counter()
        for allocator, group in zip(allocators, cfg.groups):
            allocator.update(feats, group.queries_per_sample * b, minimum, gen)
        best = min(best, time.perf_counter() - t0)
    return best


def _vit_groups() -> tuple[GroupConfig, ...]:
    return (GroupConfig("top", ("blocks.3.mlp.fc2",), 0.05, 16), GroupConfig("head", ("head",), 0.1, 16))


def _workload(cfg: TrainConfig, p: int, sizes: list[int], kind: str) -> Workload:
    b, s = cfg.batch_size, cfg.farm.shard_cost
    q = sum(g.queries_per_sample for g in cfg.groups) * b
    draws = [g.queries_per_sample * b // queries_per_draw(cfg.estimator) for g in cfg.groups]
    return Workload(
        rounds=((b, cfg.farm.clean_shard_size), (q, s)),
        params=p,
        reduction="allreduce" if kind == "lr" else "scalar",
        replay_numbers=0 if kind == "lr" else sum(d * n for d, n in zip(draws, sizes)),
        update_bytes=0 if kind == "lr" else 4 * sum(draws) + 64 * b * len(cfg.groups),
    )


def replay_seconds_per_number(bench: ScaleConfig, size: int) -> float:
    """Seconds per noise number regenerated and weighed by :func:`~flops_ray.replica.replay.replay_gradients` (one thread)."""
    items = tuple(ShardItem(j, j, 0, bench.queries_per_sample) for j in range(bench.batch_size))
    task = ShardTask(TaskKind.MAIN, 0, 0, 0, items, weights=(1.0,) * len(items))
    draws = len(RowPlan.of(task, 1, bench.seed, torch.device("cpu")).keys)
    coefs = np.ones(draws, dtype=np.float32)
    best = math.inf
    for _ in range(bench.reps):
        t0 = time.perf_counter()
        replay_gradients([task], [coefs], [NoiseLayout.dense(size)], 1, bench.seed, torch.device("cpu"))
        best = min(best, time.perf_counter() - t0)
    return best / (draws * size)


def busy_seconds() -> float:
    """CPU seconds this machine's cores have been busy, all processes (Linux ``/proc/stat``; 0 elsewhere)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def validate(bench: ScaleConfig, kind: str, call_s: float) -> dict:
    """Predicted against measured step seconds of real local farms of the digits ViT. The costs come from
    in-process steps (and, for the scalar protocol, replay timings) taken one by one between the farm's steps,
    so both see the same host (a shared host's speed drifts by a quarter within minutes); the first farm also
    measures ``host_s``: the machine's busy CPU seconds per step beyond its replica's own (shards and
    updates)."""
    out = {"workers": [], "predicted_s": [], "measured_s": [], "error": [], "host_s": 0.0, "costs": []}
    local_cfg = _config(bench, kind, 1, groups=_vit_groups(), model="digits_vit")
    for n in bench.validate_workers:
        task_s = task_overhead(bench, kind)
        cfg = _config(bench, kind, n, groups=_vit_groups(), model="digits_vit")
        with (
            LocalSteps(local_cfg, bench.seed) as local,
            Trainer(cfg, create_model("digits_vit", 10, 8, bench.seed), digits("train")) as tr,
        ):
            tr.step()
            handles = [s.handle for s in tr.backend.pool.slots]
            before, busy, reports, replay = ray.get([h.stats.remote() for h in handles]), 0.0, [], []
            for _ in range(bench.validate_steps):
                local.step()
                if kind != "lr":
                    replay.append(replay_seconds_per_number(bench, local.trainer.groups[0].size))
                busy -= busy_seconds()
                reports.append(tr.step())
                busy += busy_seconds()
            replicas = sum(
                a.busy_seconds + a.update_seconds - b.busy_seconds - b.update_seconds
                for a, b in zip(ray.get([h.stats.remote() for h in handles]), before)
            )
            timed = local.timed()
        if n == bench.validate_workers[0]:
            out["host_s"] = max(0.0, busy - replicas) / len(reports)
        replay_s = sorted(replay)[len(replay) // 2] if replay else 0.0
        costs = dataclasses.replace(costs_of(timed, call_s, task_s, replay_s), host_s=out["host_s"])
        work = _workload(local_cfg, sum(timed.sizes), timed.sizes, kind)
        out["costs"].append(asdict(costs))
        measured = sorted(r.seconds for r in reports)[len(reports) // 2]
        predicted = step_time(work, costs, n)["total"]
        out["workers"].append(n)
        out["predicted_s"].append(predicted)
        out["measured_s"].append(measured)
        out["error"].append(abs(predicted - measured) / measured)
        print(f"{kind} n={n}: predicted {predicted:.3f} s, measured {measured:.3f} s", flush=True)
    return out


def vit_b_workload(kind: str, shard: int, clean: int) -> Workload:
    """ViT-B/16 at the paper's budget: the clean pass in tasks of ``clean`` samples, then every query (the
    pilot is reused: it runs with the rest) in shards of ``shard`` forwards."""
    v = VIT_B
    b, groups = v["batch"], v["groups"]
    unit = 2  # antithetic pairs: LR and SPSA
    draws = b * v["queries_per_sample"] * groups // unit
    return Workload(
        rounds=((b, clean), (b * v["queries_per_sample"] * groups, shard)),
        params=v["params"],
        reduction="allreduce" if kind == "lr" else "scalar",
        replay_numbers=0 if kind == "lr" else draws * v["params"] // groups,
        update_bytes=0 if kind == "lr" else 4 * draws + 64 * b * groups,
    )


def best_step(kind: str, n: int, costs: Costs) -> dict[str, float]:
    """The ViT-B step on ``n`` GPUs at the ``farm.shard_cost`` (8 to 256 forwards) and ``farm.clean_shard`` (1 to
    128 samples) the model finds fastest, as a user sizing the farm for ``n`` GPUs would set them: small shards
    spread a round over more GPUs, large ones cost the driver fewer dispatches."""
    steps = [
        dict(step_time(vit_b_workload(kind, s, c), costs, n), shard_cost=s, clean_shard=c)
        for s in range(8, 257, 8)
        for c in (1, 2, 4, 8, 16, 32, 64, 128)
    ]
    return min(steps, key=lambda parts: parts["total"])


def simulate(bench: ScaleConfig, measured: Costs) -> dict:
    """Strong-scaling efficiency of ViT-B/16 steps on ``gpus`` H100s under :data:`ASSUMPTIONS`, with the
    driver's costs (``call_s``, ``task_s``, ``driver_s`` of the ViT-B step's shape) measured here."""
    gpu = json.loads((ROOT / "docs/results/bench_engine_cuda.json").read_text())["details"]["vit_b16"]
    a = ASSUMPTIONS
    out = {}
    for kind, key in (("lr", "lr"), ("es", "spsa")):
        costs = Costs(
            query_s=1.0 / gpu["queries_per_s"][key],
            call_s=measured.call_s,
            driver_s=measured.driver_s,
            fit_s=measured.fit_s,
            task_s=measured.task_s,
            link_bytes_per_s=a["link_bytes_per_s"],
            link_latency_s=a["link_latency_s"],
            apply_s_per_param=a["adam_bytes_per_param"] / a["hbm_bytes_per_s"],
            replay_s_per_number=1.0 / gpu["noise_numbers_per_s"][key] + 2.0 / a["replay_flops_per_s"],
            driver_bytes_per_s=a["driver_bytes_per_s"],
        )
        parts = {str(n): best_step(kind, n, costs) for n in (1, *bench.gpus)}
        eff = {str(n): parts["1"]["total"] / (n * parts[str(n)]["total"]) for n in bench.gpus}
        out[f"{kind}_vit_b16"] = {"efficiency": eff, "step_seconds": parts}
        print(f"{kind} ViT-B/16 simulated efficiency: { {n: round(e, 3) for n, e in eff.items()} }", flush=True)
    return out


def main(bench: ScaleConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # Logical CPUs for every replica (3 on 2 cores oversubscribe them, as the model's ``cores`` says).
    init_ray(FarmConfig(workers=max(bench.validate_workers)))
    t0 = time.perf_counter()
    driver = {kind: wire(bench, kind) for kind in ("es", "lr")}
    calls = call_costs(bench.reps)
    validation = {kind: validate(bench, kind, calls["call_seconds"]) for kind in ("lr", "es")}
    driver_s, fit_s = vit_b_driver_seconds(bench)
    measured = dict(validation["lr"]["costs"][0], driver_s=driver_s, fit_s=fit_s)
    print(f"driver per ViT-B/16 step: {driver_s * 1e3:.1f} ms, allocator fit {fit_s * 1e3:.1f} ms", flush=True)
    sim = simulate(bench, Costs(**measured))
    result = {
        "driver_bytes_per_step": {k: {"P": v["P"], "bytes": v["driver"]} for k, v in driver.items()},
        "replica_bytes_per_step": {k: {"P": v["P"], "bytes": v["replica"]} for k, v in driver.items()},
        "simulated_efficiency": {k: v["efficiency"] for k, v in sim.items()},
        "validation": validation,
        "details": {
            "costs": {**calls, "simulation": measured},
            "assumptions": ASSUMPTIONS,
            "vit_b16": VIT_B,
            "simulated_step_seconds": {k: v["step_seconds"] for k, v in sim.items()},
            "seconds": time.perf_counter() - t0,
        },
    }
    with open(out / "bench_scale.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (a few minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scale"))
    args = parser.parse_args()
    main(QUICK if args.quick else ScaleConfig(), args.out)
