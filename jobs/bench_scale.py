"""Scale-out benchmark: bytes per step against ``P``, and a step-time model checked here, then run to 256 GPUs.

- ``driver_bytes_per_step[kind]``: bytes the driver sends and receives in one training step on a real local
  farm (2 replicas), for MLPs of growing width on the digits (``P`` over 100x); ``es`` uses the scalar
  protocol (per-draw coefficients), ``lr`` the all-reduce. Parameters never cross the driver, so neither grows
  with ``P``.
- ``replica_bytes_per_step[kind]``: what each replica sends and receives: its share of the driver's messages
  plus, for LR, its part of the float32 ring all-reduce ``2 (n-1)/n x 4P`` (computed: the collective's
  traffic does not pass through Ray).
- ``validation``: the step-time model (:mod:`flops_ray.step_time`) fed with costs measured here (call
  latency, engine seconds per query, driver seconds per step, optimizer and replay seconds) predicts the
  step time of real local farms of 1-3 replicas of the digits ViT; ``error`` is ``|predicted - measured| /
  measured``.
- ``simulated_efficiency``: the same model for ViT-B/16 at the paper's budget (``B = 128``, 20 queries per
  sample and group, 4 groups, ``P = 86 M``) on ``n`` GPUs, with the per-query costs measured on an H100
  (``docs/results/bench_engine_cuda.json``) and the network and optimizer assumptions in ``assumptions``.

    python jobs/bench_scale.py --quick --out runs/bench_scale
"""

from __future__ import annotations

import argparse
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

from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, GroupConfig, TrainConfig
from flops_ray.data import digits
from flops_ray.estimators import RowPlan
from flops_ray.farm.costs import call_costs
from flops_ray.farm.ray_init import init_ray
from flops_ray.local_backend import LocalBackend
from flops_ray.losses import cross_entropy
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models import create_model
from flops_ray.replay import replay_gradients
from flops_ray.step_time import Costs, Workload, efficiency, step_time
from flops_ray.trainer import Trainer, default_backend

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
    validate_steps: int = 4
    """Timed steps per replica count (after one warm-up step)."""
    gpus: tuple[int, ...] = (8, 16, 64, 256)
    """GPU counts of the simulated efficiency."""
    reps: int = 3
    """Repetitions of the cost measurements (the best is kept)."""
    seed: int = 0


QUICK = ScaleConfig(validate_steps=3, reps=2)

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
    "the H100 float32 figures of bench_engine (docs/results/bench_engine_cuda.json); shard cost per round "
    "min(256, max(8, forwards / (4 n))) so every GPU gets several shards; driver seconds per step measured "
    "here at the local batch size and scaled linearly to B = 128",
}
VIT_B = {"batch": 128, "queries_per_sample": 20, "groups": 4, "pilot": 4, "params": 86_000_000}


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
    """The in-process backend, timing its replica's work (shards, update) apart from the driver's."""

    engine_s = apply_s = 0.0
    forwards = 0

    def run(self, tasks, meanwhile=None):
        if meanwhile is not None:
            meanwhile()
        t0 = time.perf_counter()
        results = super().run(tasks)
        self.engine_s += time.perf_counter() - t0
        self.forwards += sum(r.forwards for r in results)
        return results

    def apply(self):
        t0 = time.perf_counter()
        super().apply()
        self.apply_s += time.perf_counter() - t0


def task_overhead(bench: ScaleConfig, kind: str, calls: int = 200) -> float:
    """Seconds per shard call on a 1-replica farm beyond the same shards run in-process: tiny shards (one sample,
    one pair of queries), farm time minus in-process time, per call."""
    cfg = _config(bench, kind, 1, groups=_vit_groups(), model="digits_vit")
    x, y = digits("train").x[: bench.batch_size], digits("train").y[: bench.batch_size]
    tasks = [ShardTask(TaskKind.MAIN, 0, 0, i, (ShardItem(i % len(y), i, 0, 2),), weights=(1.0,)) for i in range(calls)]
    model = create_model("digits_vit", 10, 8, bench.seed)
    local = default_backend(cfg.replace(farm=FarmConfig()), model, cross_entropy)
    local.sync(0, x, y)
    torch.set_num_threads(1)
    local.run(tasks[:10])
    t0 = time.perf_counter()
    local.run(tasks)
    inproc = time.perf_counter() - t0
    with Trainer(cfg, model, digits("train")) as tr:
        tr.backend.sync(0, x, y)
        tr.backend.run(tasks[:10])
        t0 = time.perf_counter()
        tr.backend.run(tasks)
        farm = time.perf_counter() - t0
    return max(0.0, (farm - inproc) / calls)


def calibrate(bench: ScaleConfig, kind: str, call_s: float) -> tuple[Costs, Workload]:
    """Costs of one replica thread and of the driver, from in-process steps of the validation workload, and
    the farm's own overhead per shard call."""
    cfg = _config(bench, kind, 1, groups=_vit_groups(), model="digits_vit")
    backends: list[_TimedLocal] = []

    def factory(c, model, loss_fn):
        backends.append(
            _TimedLocal(default_backend(c.replace(farm=FarmConfig()), model, loss_fn).engine, c.update_rule)
        )
        return backends[0]

    torch.set_num_threads(1)
    with Trainer(cfg, create_model("digits_vit", 10, 8, bench.seed), digits("train"), backend_factory=factory) as tr:
        tr.step()
        b = backends[0]
        b.engine_s = b.apply_s = b.forwards = 0
        reports = tr.fit(bench.validate_steps)
        p = sum(g.size for g in tr.groups)
        sizes = [g.size for g in tr.groups]
    steps = len(reports)
    step_s = sum(r.seconds for r in reports) / steps
    query_s = b.engine_s / b.forwards
    driver_s = step_s - (b.engine_s + b.apply_s) / steps
    costs = Costs(
        query_s=query_s,
        call_s=call_s,
        driver_s=driver_s,
        task_s=task_overhead(bench, kind),
        link_bytes_per_s=1e9,
        apply_s_per_param=b.apply_s / steps / p,
        replay_s_per_number=replay_seconds_per_number(bench, sizes[0]),
        cores=os.cpu_count() or 1,
    )
    return costs, _workload(cfg, p, sizes, kind)


def _vit_groups() -> tuple[GroupConfig, ...]:
    return (GroupConfig("top", ("blocks.3.mlp.fc2",), 0.05, 16), GroupConfig("head", ("head",), 0.1, 16))


def _workload(cfg: TrainConfig, p: int, sizes: list[int], kind: str) -> Workload:
    b, s = cfg.batch_size, cfg.farm.shard_cost
    q = sum(g.queries_per_sample for g in cfg.groups) * b
    draws = [g.queries_per_sample * b // cfg.estimator.unit for g in cfg.groups]
    return Workload(
        rounds=((b, s), (q, s)),
        params=p,
        reduction="allreduce" if kind == "lr" else "scalar",
        replay_numbers=0 if kind == "lr" else sum(d * n for d, n in zip(draws, sizes)),
        update_bytes=0 if kind == "lr" else 4 * sum(draws) + 64 * b * len(cfg.groups),
    )


def replay_seconds_per_number(bench: ScaleConfig, size: int) -> float:
    """Seconds per noise number regenerated and weighed by :func:`~flops_ray.replay.replay_gradients` (one thread)."""
    items = tuple(ShardItem(j, j, 0, bench.queries_per_sample) for j in range(bench.batch_size))
    task = ShardTask(TaskKind.MAIN, 0, 0, 0, items, weights=(1.0,) * len(items))
    draws = len(RowPlan.of(task, 1, bench.seed, torch.device("cpu")).keys)
    coefs = np.ones(draws, dtype=np.float32)
    best = math.inf
    for _ in range(bench.reps):
        t0 = time.perf_counter()
        replay_gradients([task], [coefs], [size], 1, bench.seed, torch.device("cpu"))
        best = min(best, time.perf_counter() - t0)
    return best / (draws * size)


def busy_seconds() -> float:
    """CPU seconds this machine's cores have been busy, all processes (Linux ``/proc/stat``; 0 elsewhere)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def validate(bench: ScaleConfig, kind: str, costs: Costs, work: Workload) -> dict:
    """Predicted against measured step seconds of real local farms of the digits ViT. The first farm also
    measures ``host_s``: the machine's busy CPU seconds per step beyond its replica's own."""
    out = {"workers": [], "predicted_s": [], "measured_s": [], "error": [], "host_s": 0.0}
    for n in bench.validate_workers:
        cfg = _config(bench, kind, n, groups=_vit_groups(), model="digits_vit")
        with Trainer(cfg, create_model("digits_vit", 10, 8, bench.seed), digits("train")) as tr:
            tr.step()
            handles = [s.handle for s in tr.backend.pool.slots]
            before, busy = ray.get([h.stats.remote() for h in handles]), busy_seconds()
            reports = tr.fit(bench.validate_steps)
            busy = busy_seconds() - busy
            replicas = sum(
                a.busy_seconds - b.busy_seconds for a, b in zip(ray.get([h.stats.remote() for h in handles]), before)
            )
        if n == bench.validate_workers[0]:
            out["host_s"] = max(0.0, busy - replicas) / len(reports)
            costs = dataclasses.replace(costs, host_s=out["host_s"])
        measured = sorted(r.seconds for r in reports)[len(reports) // 2]
        predicted = step_time(work, costs, n)["total"]
        out["workers"].append(n)
        out["predicted_s"].append(predicted)
        out["measured_s"].append(measured)
        out["error"].append(abs(predicted - measured) / measured)
        print(f"{kind} n={n}: predicted {predicted:.3f} s, measured {measured:.3f} s", flush=True)
    return out


def vit_b_workload(kind: str, n: int) -> Workload:
    """ViT-B/16 at the paper's budget on ``n`` GPUs (pilot reused; the shard cost each round's size and ``n`` call for)."""
    v = VIT_B
    b, groups = v["batch"], v["groups"]
    pilot = b * v["pilot"] * groups
    main = b * v["queries_per_sample"] * groups - pilot

    def shard(forwards: int) -> int:
        return min(256, max(8, forwards // (4 * n)))

    unit = 2  # antithetic pairs: LR and SPSA
    draws = b * v["queries_per_sample"] * groups // unit
    return Workload(
        rounds=((b, shard(b)), (pilot, shard(pilot)), (main, shard(main))),
        params=v["params"],
        reduction="allreduce" if kind == "lr" else "scalar",
        replay_numbers=0 if kind == "lr" else draws * v["params"] // groups,
        update_bytes=0 if kind == "lr" else 4 * draws + 64 * b * groups,
    )


def simulate(bench: ScaleConfig, measured: Costs) -> dict:
    """Strong-scaling efficiency of ViT-B/16 steps on ``gpus`` H100s under :data:`ASSUMPTIONS`."""
    gpu = json.loads((ROOT / "docs/results/bench_engine_cuda.json").read_text())["details"]["vit_b16"]
    a = ASSUMPTIONS
    out = {}
    for kind, key in (("lr", "lr"), ("es", "spsa")):
        costs = Costs(
            query_s=1.0 / gpu["queries_per_s"][key],
            call_s=measured.call_s,
            driver_s=measured.driver_s * VIT_B["batch"] / bench.batch_size,
            task_s=measured.task_s,
            link_bytes_per_s=a["link_bytes_per_s"],
            link_latency_s=a["link_latency_s"],
            apply_s_per_param=a["adam_bytes_per_param"] / a["hbm_bytes_per_s"],
            replay_s_per_number=1.0 / gpu["noise_numbers_per_s"][key] + 2.0 / a["replay_flops_per_s"],
            driver_bytes_per_s=a["driver_bytes_per_s"],
        )
        eff = {str(n): efficiency(vit_b_workload(kind, n), costs, n) for n in bench.gpus}
        parts = {str(n): step_time(vit_b_workload(kind, n), costs, n) for n in (1, *bench.gpus)}
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
    validation, measured = {}, {}
    for kind in ("lr", "es"):
        costs, work = calibrate(bench, kind, calls["call_seconds"])
        measured[kind] = asdict(costs)
        validation[kind] = validate(bench, kind, costs, work)
    sim = simulate(bench, Costs(**measured["lr"]))
    result = {
        "driver_bytes_per_step": {k: {"P": v["P"], "bytes": v["driver"]} for k, v in driver.items()},
        "replica_bytes_per_step": {k: {"P": v["P"], "bytes": v["replica"]} for k, v in driver.items()},
        "simulated_efficiency": {k: v["efficiency"] for k, v in sim.items()},
        "validation": validation,
        "details": {
            "costs": {**calls, "measured": measured},
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
