"""Scale-out benchmark: bytes per step against ``P``, and a step-time model checked here, then run to 256 GPUs.

- ``driver_bytes_per_step[kind]``: bytes the driver sends and receives in one training step on a real local
  farm (2 replicas), for MLPs of growing width on the digits (``P`` over 100x); ``es`` uses the scalar
  protocol (per-draw coefficients, replayed sliced), ``lr`` the all-reduce. Parameters never cross the driver,
  so neither grows with ``P``.
- ``replica_bytes_per_step[kind]``: what each replica sends and receives: its share of the driver's messages
  plus its part of the collective (computed: its traffic does not pass through Ray): for LR the exact
  all-reduce, ``(n-1)/n x (4 P_g ceil(T_g / n) + 8 P_g)`` per group; for ES the sliced replay's all-gather of
  the float64 sums, ``(n-1)/n x 8P``.
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

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from flops_ray import (
    AllocatorConfig,
    EstimatorConfig,
    FarmConfig,
    GroupConfig,
    TrainConfig,
    Trainer,
    create_model,
    digits,
    load_config,
)
from flops_ray.studies.driver_costs import replay_seconds_per_number, vit_b_driver_seconds
from flops_ray.studies.farm_probe import call_costs, start_ray, wire_bytes
from flops_ray.studies.job_cli import job_parser, run_main
from flops_ray.studies.results import write_result
from flops_ray.studies.scale_simulation import ASSUMPTIONS, VIT_B, simulate, workload_of
from flops_ray.studies.shard_tasks import pair_tasks
from flops_ray.studies.step_time import Costs, step_time
from flops_ray.studies.timed_backend import LocalSteps
from flops_ray.studies.timing import busy_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ScaleConfig:
    """What the benchmark measures."""

    widths: tuple[int, ...] = (16, 64, 400)
    """Hidden widths of the MLP family behind the bytes figures (``P`` from 1.5 k to 190 k)."""
    wire_replicas: int = 2
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
    """Queries per sample and group of the step-time check: enough for compute-dominated steps, as a GPU
    farm's are."""
    validate_replicas: tuple[int, ...] = (1, 2, 3)
    """Replica counts of the local step-time check."""
    validate_steps: int = 8
    """Timed steps per replica count (after one warm-up step)."""
    gpus: tuple[int, ...] = (8, 16, 64, 256)
    """GPU counts of the simulated efficiency."""
    reps: int = 3
    """Repetitions of the cost measurements (the best is kept)."""
    seed: int = 0


QUICK = ScaleConfig(reps=2)


def mlp(width: int) -> nn.Module:
    """The MLP family of the bytes figures: 64 digit pixels -> width -> width -> 10."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


MLP_GROUPS = (GroupConfig("mlp", ("1", "3", "5"), sigma=0.01, queries_per_sample=16),)
VIT_GROUPS = (GroupConfig("top", ("blocks.3.mlp.fc2",), 0.05, 16), GroupConfig("head", ("head",), 0.1, 16))
"""The digits ViT's groups of the step-time check."""


def _config(bench: ScaleConfig, kind: str, replicas: int, groups=MLP_GROUPS, model: str = "mlp") -> TrainConfig:
    q = bench.queries_per_sample if model == "mlp" else bench.validate_queries
    groups = tuple(GroupConfig(g.name, g.modules, g.sigma, q) for g in groups)
    return TrainConfig(
        model=model,
        batch_size=bench.batch_size,
        groups=groups,
        estimator=EstimatorConfig(kind=kind),
        allocator=AllocatorConfig(kind="neyman", signal="memory"),
        # ES replays sliced (each replica a share of the noise, then one all-gather), as ViT-B's farm does.
        farm=FarmConfig(
            backend="ray",
            replicas=replicas,
            shard_cost=bench.shard_cost,
            num_cpus_per_replica=1,
            replay="full" if kind == "lr" else "sliced",
        ),
        seed=bench.seed,
    )


def _vit_config(bench: ScaleConfig, kind: str, replicas: int) -> TrainConfig:
    return _config(bench, kind, replicas, groups=VIT_GROUPS, model="digits_vit")


def _digits_vit(bench: ScaleConfig) -> nn.Module:
    return create_model("digits_vit", 10, 8, bench.seed)


def wire(bench: ScaleConfig, kind: str) -> dict:
    """Driver and replica bytes per step at every width (a real local farm of ``wire_replicas`` replicas)."""
    train = digits("train")
    out = {"P": [], "driver": [], "replica": []}
    n = bench.wire_replicas
    for width in bench.widths:
        with Trainer(_config(bench, kind, n), mlp(width), train) as trainer:
            trainer.step()
            before = wire_bytes(trainer.backend)
            trainer.fit(bench.wire_steps)
            driver = (wire_bytes(trainer.backend) - before) / bench.wire_steps
            p = sum(g.size for g in trainer.groups)
        # LR: its tasks' partials to their owners and the owners' float64 sums back; ES: the sliced replay's sums.
        tasks = math.ceil(bench.queries_per_sample * bench.batch_size / bench.shard_cost)
        collective = (n - 1) / n * (4 * p * math.ceil(tasks / n) * (kind == "lr") + 8 * p)
        out["P"].append(p)
        out["driver"].append(driver)
        out["replica"].append(driver / n + collective)
        print(
            f"{kind} P={p:,}: driver {driver / 1e3:.1f} kB/step, replica {(driver / n + collective) / 1e3:.1f} kB",
            flush=True,
        )
    return out


def task_overhead(bench: ScaleConfig, kind: str, calls: int = 200) -> float:
    """Seconds per shard call on a 1-replica farm beyond the replica's own work on it: tiny shards (one sample,
    one pair of queries), the farm's wall time minus the replica's busy time over the same calls, per call
    (both timed in one run, so a host whose speed drifts moves them together)."""
    train = digits("train")
    x, y = train.x[: bench.batch_size], train.y[: bench.batch_size]
    tasks = pair_tasks(calls, len(y))
    with Trainer(_vit_config(bench, kind, 1), _digits_vit(bench), train) as tr:
        tr.backend.sync(0, x, y)
        tr.backend.run(tasks[:10])
        before = tr.backend.replica_stats()[0].busy_seconds
        t0 = time.perf_counter()
        tr.backend.run(tasks)
        farm = time.perf_counter() - t0
        busy = tr.backend.replica_stats()[0].busy_seconds - before
    return max(0.0, (farm - busy) / calls)


def _replica_seconds(after: list, before: list) -> float:
    """The replicas' own seconds (shards and updates) between two ``replica_stats()`` readings."""
    return sum(a.busy_seconds + a.update_seconds - b.busy_seconds - b.update_seconds for a, b in zip(after, before))


def validate(bench: ScaleConfig, kind: str, call_s: float, fanout_s: float) -> dict:
    """Predicted against measured step seconds of real local farms of the digits ViT. The costs come from
    in-process steps (and, for the scalar protocol, replay timings) taken one by one between the farm's steps,
    so both see the same host (a shared host's speed drifts within minutes); the first farm also measures
    ``host_s``: the machine's busy CPU seconds per step beyond its replica's own (shards and updates)."""
    out = {"replicas": [], "predicted_s": [], "measured_s": [], "error": [], "host_s": 0.0, "costs": []}
    local_cfg = _vit_config(bench, kind, 1)
    for n in bench.validate_replicas:
        task_s = task_overhead(bench, kind)
        with (
            LocalSteps(local_cfg, bench.seed) as local,
            Trainer(_vit_config(bench, kind, n), _digits_vit(bench), digits("train")) as tr,
        ):
            tr.step()
            before, busy, reports, replay = tr.backend.replica_stats(), 0.0, [], []
            for _ in range(bench.validate_steps):
                local.step()
                if kind != "lr":
                    size = local.trainer.groups[0].size
                    replay.append(
                        replay_seconds_per_number(
                            bench.batch_size, bench.queries_per_sample, size, bench.seed, bench.reps
                        )
                    )
                busy -= busy_cpu_seconds()
                reports.append(tr.step())
                busy += busy_cpu_seconds()
            replicas = _replica_seconds(tr.backend.replica_stats(), before)
            timed = local.timed()
        if n == bench.validate_replicas[0]:
            out["host_s"] = max(0.0, busy - replicas) / len(reports)
        replay_s = sorted(replay)[len(replay) // 2] if replay else 0.0
        costs = dataclasses.replace(timed.costs(call_s, task_s, replay_s), host_s=out["host_s"], fanout_s=fanout_s)
        out["costs"].append(asdict(costs))
        measured = sorted(r.seconds for r in reports)[len(reports) // 2]
        predicted = step_time(workload_of(local_cfg, timed.sizes, kind, sliced=kind != "lr"), costs, n)["total"]
        out["replicas"].append(n)
        out["predicted_s"].append(predicted)
        out["measured_s"].append(measured)
        out["error"].append(abs(predicted - measured) / measured)
        print(f"{kind} n={n}: predicted {predicted:.3f} s, measured {measured:.3f} s", flush=True)
    return out


def main(bench: ScaleConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # Logical CPUs for every replica (3 on 2 cores oversubscribe them, as the model's ``cores`` says).
    start_ray(max(bench.validate_replicas))
    t0 = time.perf_counter()
    driver = {kind: wire(bench, kind) for kind in ("es", "lr")}
    calls = call_costs(bench.reps)
    validation = {kind: validate(bench, kind, calls["call_seconds"], calls["fanout_seconds"]) for kind in ("lr", "es")}
    vit, _ = load_config(ROOT / "jobs/configs/vit_b16_cifar100.yaml")
    driver_s, fit_s = vit_b_driver_seconds(vit, bench.seed, bench.reps)
    measured = dict(validation["lr"]["costs"][0], driver_s=driver_s, fit_s=fit_s)
    print(f"driver per ViT-B/16 step: {driver_s * 1e3:.1f} ms, allocator fit {fit_s * 1e3:.1f} ms", flush=True)
    gpu = json.loads((ROOT / "docs/results/bench_engine_cuda.json").read_text())["details"]["vit_b16"]
    sim = simulate(bench.gpus, gpu, Costs(**measured))
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
    write_result(out, "bench_scale", result)
    return result


if __name__ == "__main__":
    run_main(
        job_parser(__doc__, "bench_scale", "fewer timed steps (a few minutes on 2 cores)"),
        lambda args: main(QUICK if args.quick else ScaleConfig(), args.out),
    )
