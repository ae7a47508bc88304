"""Workloads for the step-time model: a config's step as run here, and ViT-B/16 at the paper's budget on n GPUs."""

from __future__ import annotations

import math

from flops_ray.config import TrainConfig
from flops_ray.estimators import queries_per_draw
from flops_ray.studies.step_time import Costs, Workload, step_time

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
    "the model finds fastest on n GPUs; the driver's call, fan-out, task and per-step seconds are measured here (per "
    "step: the shipped ViT-B/16 config's step shape, planned and allocated on the driver); its allocator fit, "
    "timed alone on one thread here, runs in a driver thread with a core of its own from the main round to "
    "the next step's allocation",
}
"""The GPU cluster the simulation assumes (stated, not measured): DGX H100-class nodes."""

VIT_B = {"batch": 128, "queries_per_sample": 20, "groups": 4, "pilot": 4, "params": 86_000_000}
"""The paper's ViT-B/16 step: batch, queries per sample and group, layer groups, pilot queries, parameters."""


def workload_of(cfg: TrainConfig, sizes: list[int], kind: str, sliced: bool = False) -> Workload:
    """The step of ``cfg`` (groups of ``sizes`` parameters) as the model sees it: the clean pass, then every
    query in ``farm.shard_cost`` shards; ``kind`` ``lr`` reduces by all-reduce, the others by coefficients,
    replayed ``sliced`` or in full."""
    b, s = cfg.batch_size, cfg.farm.shard_cost
    q = sum(g.queries_per_sample for g in cfg.groups) * b
    draws = [g.queries_per_sample * b // queries_per_draw(cfg.estimator) for g in cfg.groups]
    return Workload(
        rounds=((b, cfg.farm.clean_shard_size), (q, s)),
        params=sum(sizes),
        reduction="allreduce" if kind == "lr" else "sliced" if sliced else "scalar",
        groups=tuple((p, math.ceil(g.queries_per_sample * b / s)) for p, g in zip(sizes, cfg.groups)),
        replay_numbers=0 if kind == "lr" else sum(d * n for d, n in zip(draws, sizes)),
        update_bytes=0 if kind == "lr" else 4 * sum(draws) + 64 * b * len(cfg.groups),
    )


def vit_b_workload(kind: str, shard: int, clean: int) -> Workload:
    """ViT-B/16 at the paper's budget: the clean pass in tasks of ``clean`` samples, then every query (the
    pilot is reused: it runs with the rest) in shards of ``shard`` forwards; ES replays sliced (``farm.replay:
    auto`` at ViT-B's size)."""
    v = VIT_B
    b, groups = v["batch"], v["groups"]
    unit = 2  # antithetic pairs: LR and SPSA
    draws = b * v["queries_per_sample"] * groups // unit
    per_group = (v["params"] // groups, math.ceil(b * v["queries_per_sample"] / shard))
    return Workload(
        rounds=((b, clean), (b * v["queries_per_sample"] * groups, shard)),
        params=v["params"],
        reduction="allreduce" if kind == "lr" else "sliced",
        groups=(per_group,) * groups,
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


def simulate(gpus: tuple[int, ...], gpu: dict, measured: Costs) -> dict:
    """Strong-scaling efficiency of ViT-B/16 steps on ``gpus`` H100s under :data:`ASSUMPTIONS`.

    Args:
        gpus: GPU counts.
        gpu: the engine benchmark's ViT-B/16 figures on one GPU (``queries_per_s``, ``noise_numbers_per_s``).
        measured: the driver's costs (``call_s``, ``fanout_s``, ``task_s``, ``driver_s``, ``fit_s``) measured here.
    """
    a = ASSUMPTIONS
    out = {}
    for kind, key in (("lr", "lr"), ("es", "spsa")):
        costs = Costs(
            query_s=1.0 / gpu["queries_per_s"][key],
            call_s=measured.call_s,
            driver_s=measured.driver_s,
            fanout_s=measured.fanout_s,
            fit_s=measured.fit_s,
            task_s=measured.task_s,
            link_bytes_per_s=a["link_bytes_per_s"],
            link_latency_s=a["link_latency_s"],
            apply_s_per_param=a["adam_bytes_per_param"] / a["hbm_bytes_per_s"],
            replay_s_per_number=1.0 / gpu["noise_numbers_per_s"][key] + 2.0 / a["replay_flops_per_s"],
            driver_bytes_per_s=a["driver_bytes_per_s"],
        )
        parts = {str(n): best_step(kind, n, costs) for n in (1, *gpus)}
        eff = {str(n): parts["1"]["total"] / (n * parts[str(n)]["total"]) for n in gpus}
        out[f"{kind}_vit_b16"] = {"efficiency": eff, "step_seconds": parts}
        print(f"{kind} ViT-B/16 simulated efficiency: { {n: round(e, 3) for n, e in eff.items()} }", flush=True)
    return out
