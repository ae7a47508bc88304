"""Estimator benchmark (paper Figure 4 at small scale) on the default digits ViT.

1. Cosine between the estimated and the backprop gradient of one layer against queries per data point,
   for equal, bernoulli, gaussian and neyman allocation, LR and SPSA, an early and a late layer.
2. Mean squared error of the batch gradient under neyman vs equal allocation at the same budget,
   measured over repetitions with fresh noise, against the ratio ``J(neyman) / J(equal)`` predicted
   from pilot trace estimates (Theorem 1: the MSE is ``(1/B^2) sum_j T_j / A_j``).

    python jobs/bench_estimator.py --quick --out runs/bench
    ray job submit --working-dir . -- python jobs/bench_estimator.py --out runs/bench
"""

from __future__ import annotations

import time
from pathlib import Path

from flops_ray.studies.estimator_study import QUICK, EstimatorStudy, cosine_sweep, plot_cosines, variance_ratio
from flops_ray.studies.job_cli import job_parser, run_main
from flops_ray.studies.results import write_result


def main(bench: EstimatorStudy, out: Path) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rows = cosine_sweep(bench)
    ratio = variance_ratio(bench)
    result = {"cosine": rows, "variance_ratio": ratio, "seconds": time.perf_counter() - t0}
    path = write_result(out, "bench_estimator", result)
    plot_cosines(rows, out / "bench_estimator.png")
    print(f"variance ratio neyman/equal: predicted {ratio['predicted']:.3f}, measured {ratio['measured']:.3f}")
    print(f"wrote {path} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    run_main(
        job_parser(__doc__, "bench_estimator", "small sweep, under 3 minutes on 2 cores"),
        lambda args: main(QUICK if args.quick else EstimatorStudy(), args.out),
    )
