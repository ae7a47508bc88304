"""Engine benchmark: one replica's perturbed queries against plain inference of the same model.

A query that runs the whole model can never be cheaper than one forward pass; LR also assembles
``sum_t eps_t h_t^T`` per query. The engine shares the blocks before the group between a sample's queries
(``estimator.share_prefix``, :mod:`flops_ray.estimators.prefix`), so a query of a high group costs less
than a forward and its efficiency can pass 1; each kind is also timed with every query through the whole
model, the bound the first sentence states.
On one main shard of ``Q`` queries, planned as the trainer plans it (``flops_ray.step.plan``, equal counts,
the config's pilot and pair settings), on the same rows and device:

- ``efficiency[workload][kind]``: engine queries/s (``QueryEngine.run_on_device`` on the shard: the
  replica's work, its gradient sum left on the device for the reduction) divided by plain
  batched inference rows/s (``model(x)`` under ``torch.inference_mode``, in the engine's ``max_rows``
  chunks) of the same ``Q`` rows; each repetition times the two back to back, the median ratio is kept.
  ``details[workload]["efficiency_whole_model"][kind]``: the same with ``estimator.share_prefix`` off;
  ``details[workload]["shared_prefix"]``: the block where a sample's queries fan out (``null``: none);
  ``details[workload]["efficiency_rank1_noise"][kind]``: SPSA/ES with ``estimator.noise: rank1``.
- ``lr_bound[workload]``: ``F / (F + A)``, with ``F`` the forward flops per row (``FlopCounterMode``,
  attention counted through its matmuls) and ``A`` the LR assembly flops per query of the group's
  linears (``2 * in * out`` per token, plus ``out`` per token for a bias): the best LR efficiency of
  queries through the whole model.
- ``details[workload]["noise_bound"][kind]``: ``t_infer / (t_infer + t_noise)``, the best efficiency the
  kind could reach on this device if its queries cost a plain forward plus making their noise and
  nothing else (SPSA/ES need ``P_g`` numbers per draw, LR one per output of the group's linears).
- ``noise_numbers_per_s``: independent Gaussian numbers per second (a pair shares one draw) of the
  engine's noise path (``RowPlan.draws``, then each row's signed copy, chunk by chunk) on the ViT-B/16 LR
  shard; ``details`` has every workload and kind.
- ``peak_replica_bytes["vit_b16"]``: peak memory of one replica (model, batch, clean pass and one main
  shard of ``peak_rows`` queries of the shipped config's estimator) in a fresh process, above what the
  process held before building it: ``max_memory_allocated`` on CUDA, peak RSS on CPU. The full run uses
  the shipped config's ``farm.shard_cost``; ``--quick`` uses fewer rows and says how many in ``peak_rows``.
  ``peak_replica_bytes["lm"]``: the same at the shipped shard, and ``peak_vs_plain["lm"]`` it divided by the peak
  of plain inference of the shard's rows in place of the shard (``peak_plain_bytes``).

Workloads: ``digits_vit`` is the default config's first group (one linear) with LR, SPSA and ES;
``vit_b16`` is the ViT-B/16 config's ``top`` group at 224 px, randomly initialised (no weights are
downloaded; speed does not depend on them), with LR and SPSA; ``lm`` is a causal LM read through ``hf:``
(:mod:`flops_ray.studies.lm_bench`: GPT-2 small's shape with random weights, ``--quick`` a smaller one) on
random tokens, one candidate per sample, its first default group (``mlp``,
:func:`~flops_ray.models.lm_groups.lm_groups`) with LR and SPSA. The device is CUDA when available (then every
workload's shard is its config's ``farm.shard_cost``), else CPU; both sides of a ratio run on the torch
threads a replica of the config would use (``farm.num_cpus_per_replica``, at most this machine's).

    python jobs/bench_engine.py --quick --out docs/results
    python jobs/bench_engine.py --out runs/bench_engine
    python jobs/bench_engine.py --quick --only lm --out runs/be_lm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from flops_ray import TrainConfig, load_config
from flops_ray.app.job_config import jobs_dir
from flops_ray.studies.engine_shard import Variant, engine_and_shard, infer, noise_seconds, shard_rows, variants
from flops_ray.studies.engine_workload import Workload, load_workload, with_saved_lm
from flops_ray.studies.flop_bound import lr_bound
from flops_ray.studies.job_cli import job_parser, run_main
from flops_ray.studies.peak_memory import held_bytes, in_fresh_process
from flops_ray.studies.results import write_result
from flops_ray.studies.timing import seconds, torch_threads

DIGITS = Workload("digits_ops_lr.yaml", "top", ("lr", "spsa", "es"), model="digits_vit", reps=21)
"""The default digits ViT without its backprop pretraining (same architecture, so the same speed)."""
VIT_B16 = Workload("vit_b16_cifar100.yaml", "top", ("lr", "spsa"), shard=40)
"""Fewer queries than the config's 256 per shard (two samples' 20): SPSA's noise alone is 28M floats per draw."""
LM = Workload("digits_ops_lr.yaml", "mlp", ("lr", "spsa"), lm="gpt2_small", shard=32, reps=3)
"""GPT-2 small on the digits config's estimator (its default groups become the LM's); two samples' 16 queries."""
PEAKS = {"vit_b16": False, "lm": True}
"""Workloads whose replica peak memory is measured, and whether plain inference's is measured beside it."""


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures."""

    digits_vit: Workload = DIGITS
    """The digits ViT workload."""
    vit_b16: Workload = VIT_B16
    """The ViT-B/16 workload; its config also sets the peak memory shard."""
    peak_rows: int = 0
    """Queries in the shard behind ``peak_replica_bytes["vit_b16"]`` (0: its config's ``farm.shard_cost``)."""
    lm: Workload = LM
    """The causal LM workload (its peak memory at its config's ``farm.shard_cost``)."""
    only: tuple[str, ...] = ()
    """The workloads measured, by JSON key (empty: all)."""

    def workloads(self) -> dict[str, Workload]:
        """The workloads measured, by their JSON key."""
        works = {"digits_vit": self.digits_vit, "vit_b16": self.vit_b16, "lm": self.lm}
        return {name: work for name, work in works.items() if not self.only or name in self.only}


QUICK = BenchConfig(
    replace(DIGITS, reps=15), replace(VIT_B16, shard=24, reps=5), peak_rows=64, lm=replace(LM, lm="quick")
)
"""ViT-B/16 on a shard of 24 queries: a sample's 20 and 4 of the next, two samples as a training shard holds
(the prefix check runs on the first chunk, as in training)."""


def device() -> torch.device:
    """Where models, rows and noise live: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure(name: str, work: Workload, where: torch.device) -> dict:
    """Efficiency of every kind of ``work``, its LR flop bound and its noise rates, on a replica's threads."""
    cfg, group, model, engine_args = load_workload(work)
    with torch_threads(round(cfg.farm.num_cpus_per_replica)) as threads:
        print(f"{name}: {cfg.model}, group {work.group}, {threads} torch threads on {where}", flush=True)
        return {**_measure(name, work, where, cfg, group, model, engine_args), "torch_threads": threads}


def _measure(
    name: str, work: Workload, where: torch.device, cfg: TrainConfig, group: int, model: nn.Module, engine_args: dict
) -> dict:
    # A GPU runs the config's own shard: a few rows would time kernel launches, not queries.
    shard = cfg.farm.shard_cost if where.type == "cuda" else work.shard or cfg.farm.shard_cost
    replicas = {v: engine_and_shard(cfg, group, model, shard, where, v, **engine_args) for v in variants(work.kinds)}
    first = next(iter(replicas.values()))[0]
    rows = shard_rows(*next(iter(replicas.values())))
    inputs = first.batch()[0][rows.pos]
    infer(first, inputs, rows)  # warm-up
    for engine, task in replicas.values():
        engine.run(task)  # warm-up (LR probes its output sizes once)
    times = _interleaved(name, work, replicas, inputs, rows)
    ratio = {v: statistics.median(plain / perturbed for plain, perturbed in s) for v, s in times.items()}
    efficiency = {k: ratio[Variant(k)] for k in work.kinds}
    whole = {k: ratio[Variant(k, share_prefix=False)] for k in work.kinds}
    rank1 = {v.kind: r for v, r in ratio.items() if v.noise == "rank1"}
    made = {k: noise_seconds(*replicas[Variant(k)], work.reps) for k in work.kinds}
    noise = {kind: numbers / sec for kind, (numbers, sec) in made.items()}
    plain = statistics.median(plain for s in times.values() for plain, _ in s)
    bound = lr_bound(model, cfg.groups[group], inputs)
    print(
        f"{name}: efficiency {_fmt(efficiency)} (whole model per query: {_fmt(whole)}; rank-1 noise: "
        f"{_fmt(rank1)}), LR bound {bound['bound']:.3f}, noise/s {_fmt(noise)}",
        flush=True,
    )
    return {
        "efficiency": efficiency,
        "efficiency_whole_model": whole,
        "efficiency_rank1_noise": rank1,
        "shared_prefix": replicas[Variant(work.kinds[0])][0].estimators[group].prefix.cut,
        "lr_bound": bound["bound"],
        "forward_flops_per_row": bound["forward_flops"],
        "assembly_flops_per_query": bound["assembly_flops"],
        "shard_queries": len(rows),
        "max_rows": first.est.max_rows,
        "rows_per_s": len(rows) / plain,
        "queries_per_s": {
            k: len(rows) / statistics.median(perturbed for _, perturbed in times[Variant(k)]) for k in work.kinds
        },
        "noise_numbers_per_s": noise,
        "noise_bound": {kind: plain / (plain + sec) for kind, (_, sec) in made.items()},
    }


def _interleaved(name: str, work: Workload, replicas: dict, inputs: torch.Tensor, rows) -> dict:
    """Per variant, ``(plain inference, engine)`` seconds of every repetition, the two timed back to back so both
    sides of a ratio see the same load of a shared machine."""
    times: dict[Variant, list[tuple[float, float]]] = {v: [] for v in replicas}
    for rep in range(work.reps):
        for v, (engine, task) in replicas.items():
            plain = seconds(lambda e=engine: infer(e, inputs, rows), engine.device)
            times[v].append((plain, seconds(lambda e=engine, t=task: e.run_on_device(t), engine.device)))
        last = {str(v): s[-1][0] / s[-1][1] for v, s in times.items()}
        print(f"{name} rep {rep + 1}/{work.reps}: {len(rows)} queries, efficiency {_fmt(last)}", flush=True)
    return times


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in values.items())


def peak_replica(work: Workload, rows: int, plain: bool) -> dict:
    """Peak memory of one replica in this process: model, batch, clean pass and one main shard of ``rows``
    queries of the config's own estimator (``plain``: plain inference of the shard's rows in its place), above
    what the process held before (imports and runtime)."""
    where = device()
    before = held_bytes(where)
    cfg, group, model, engine_args = load_workload(work)
    est = cfg.estimator
    variant = Variant(est.kind, est.share_prefix, est.noise)
    engine, task = engine_and_shard(cfg, group, model, rows, where, variant, **engine_args)
    if plain:
        plan = shard_rows(engine, task)
        infer(engine, engine.batch()[0][plan.pos], plan)
    else:
        engine.run(task)
    return {"bytes": held_bytes(where) - before, "rows": task.cost, "kind": cfg.estimator.kind}


def peak_replica_bytes(work: Workload, rows: int, plain: bool = False) -> dict:
    """:func:`peak_replica` in a fresh interpreter, so nothing this process allocated counts."""
    spec = json.dumps({"work": dataclasses.asdict(work), "rows": rows, "plain": plain})
    return in_fresh_process([str(Path(__file__).resolve()), "--peak", spec])


def peak_memory(name: str, work: Workload, rows: int) -> dict:
    """``work``'s replica peak on ``rows`` queries (0: its config's shard), and plain inference's where
    :data:`PEAKS` asks."""
    shipped = load_config(jobs_dir() / "configs" / work.config)[0].farm.shard_cost
    rows = rows or shipped
    print(f"{name} peak memory: one replica, a {rows}-query shard (shipped: {shipped}), fresh process", flush=True)
    peak = {**peak_replica_bytes(work, rows), "shipped": shipped}
    if PEAKS[name]:
        peak["plain_bytes"] = peak_replica_bytes(work, rows, plain=True)["bytes"]
    print(f"{name} peak replica memory, bytes: {peak['bytes']:.3g} (plain: {peak.get('plain_bytes', 0):.3g})")
    return peak


def main(bench: BenchConfig, out: Path) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    where = device()
    with tempfile.TemporaryDirectory() as tmp:
        works = {name: with_saved_lm(work, Path(tmp) / name) for name, work in bench.workloads().items()}
        details = {name: measure(name, work, where) for name, work in works.items()}
        if where.type == "cuda":
            torch.cuda.empty_cache()  # the peak runs are other processes: hand back what the timed replicas cached
        rows = {"vit_b16": bench.peak_rows}
        peaks = {name: peak_memory(name, work, rows.get(name, 0)) for name, work in works.items() if name in PEAKS}
    peak = {k: {n: p[k] for n, p in peaks.items() if k in p} for k in ("bytes", "rows", "shipped", "plain_bytes")}
    result = {
        "device": where.type,
        "efficiency": {name: d["efficiency"] for name, d in details.items()},
        "lr_bound": {name: d["lr_bound"] for name, d in details.items()},
        "noise_numbers_per_s": details["vit_b16"]["noise_numbers_per_s"]["lr"] if "vit_b16" in details else None,
        "peak_replica_bytes": peak["bytes"],
        "peak_rows": peak["rows"],
        "peak_shipped_shard_rows": peak["shipped"],
        "peak_plain_bytes": peak["plain_bytes"],
        "peak_vs_plain": {name: peak["bytes"][name] / plain for name, plain in peak["plain_bytes"].items()},
        "details": details,
        "config": dataclasses.asdict(bench),
        "seconds": time.perf_counter() - t0,
    }
    path = write_result(out, "bench_engine", result)
    print(f"wrote {path} in {result['seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    parser = job_parser(__doc__, "bench_engine", "few repetitions and ViT-B rows (minutes on 2 cores)")
    parser.add_argument("--precision", default="", help="estimator.precision of every workload (default: the config's)")
    parser.add_argument("--only", nargs="+", default=(), help="workloads measured: digits_vit, vit_b16, lm (all)")
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # the fresh process of peak_replica_bytes

    def _main(args: argparse.Namespace) -> None:
        if args.peak:
            spec = json.loads(args.peak)
            work = Workload(**{**spec["work"], "kinds": tuple(spec["work"]["kinds"])})
            print(json.dumps(peak_replica(work, spec["rows"], spec["plain"])))
            return
        bench = replace(QUICK if args.quick else BenchConfig(), only=tuple(args.only))
        main(
            replace(bench, **{k: replace(w, precision=args.precision) for k, w in bench.workloads().items()}), args.out
        )

    run_main(parser, _main)
