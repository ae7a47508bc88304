"""Telemetry benchmark: is a step's predicted variance ratio the one its allocation realises?

Each step's telemetry reports, per group, ``variance_ratio = J(A) / J(equal)`` from the traces its allocator
read. On the default config (``jobs/configs/digits_ops_lr.yaml``, in-process), at checkpoints of its run, the
batch of the next step is estimated ``reps`` times with fresh noise by the config's allocator and by equal
allocation at the same budget (paired noise); the realised ratio is their mean squared errors to the exact
gradient. Reported per group: predicted, realised, the relative error, and the mean of the telemetry's own
``realised_variance_ratio`` (from the traces the step's queries measured).

    python jobs/bench_telemetry.py --quick --out runs/bench_telemetry
    ray job submit --working-dir . -- python jobs/bench_telemetry.py --out runs/bench_telemetry
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from flops_ray.app.job_config import DEFAULT_CONFIG, load_config
from flops_ray.app.run import build
from flops_ray.studies.job_cli import job_parser, run_main
from flops_ray.studies.results import write_result
from flops_ray.studies.variance_prediction import predicted_vs_realised


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures."""

    checkpoints: tuple[int, ...] = (0, 100)
    """Steps of the default run at which the ratio is measured (the batch that step would train on)."""
    reps: int = 100
    """Paired repetitions per checkpoint."""


QUICK = BenchConfig(checkpoints=(0,), reps=16)


def main(bench: BenchConfig, out: Path) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg, _ = load_config(DEFAULT_CONFIG, ["farm.backend=local"])
    trainer = build(cfg)
    rows = []
    with trainer:
        for s in bench.checkpoints:
            trainer.fit(s - trainer.step_count)
            row = predicted_vs_realised(trainer, bench.reps)
            for g in row["groups"]:
                print(
                    f"step {s:4d} {g['group']:5s}: predicted {g['predicted']:.3f}  realised {g['realised']:.3f} "
                    f"(se {g['realised_se']:.3f})  error {100 * g['relative_error']:.1f}%  "
                    f"telemetry {g['telemetry_realised']:.3f}",
                    flush=True,
                )
            rows.append(row)
    result = {
        "config": str(DEFAULT_CONFIG.name),
        "checkpoints": rows,
        "worst_relative_error": max(g["relative_error"] for r in rows for g in r["groups"]),
        "bench": dataclasses.asdict(bench),
        "seconds": time.perf_counter() - t0,
    }
    path = write_result(out, "bench_telemetry", result)
    print(f"worst relative error {100 * result['worst_relative_error']:.1f}%; wrote {path}")
    return result


if __name__ == "__main__":
    run_main(
        job_parser(__doc__, "bench_telemetry", "the start of the run only, 16 repetitions (~1 min)"),
        lambda args: main(QUICK if args.quick else BenchConfig(), args.out),
    )
