"""The paper's evidence at small scale, with one command: Table 1, Figure 4 and Figure 5.

- Table 1: test accuracy (mean and std over seeds) of BP, MeZO, n-SPSA, LR, OPS-SPSA, OPS-LR and the
  Neyman variants of SPSA and LR, fine-tuning the digits-pretrained ViT's default layer groups at one
  query budget, on scikit-learn's digits and on a generated shapes set stored as Parquet.
- Figure 4: cosine to the backprop gradient against queries per data point for equal, bernoulli,
  gaussian and neyman allocation (the sweep of ``jobs/bench_estimator.py``), and its MSE-ratio check.
- Figure 5: seconds per training step with and without an allocator, from the Table 1 runs.
- Budget: the same accuracy with fewer queries? The default allocator (Neyman from the clean-pass proxy)
  at 75% of equal allocation's budget against equal at 100%, paired by seed, trained longer.

Writes ``reproduce.json``, ``table1.png``, ``figure4.png`` and ``figure5.png`` to ``--out`` (``--part budget``:
``budget.json``); docs/RESULTS.md shows the figures of a full run.

    python jobs/reproduce.py --quick --out runs/reproduce
    python jobs/reproduce.py --out docs/results
    python jobs/reproduce.py --part budget --out docs/results
    ray job submit --working-dir . -- python jobs/reproduce.py --out runs/reproduce
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flops_ray import AllocatorConfig, DataConfig, EstimatorConfig, FarmConfig, TrainConfig, Trainer, create_model
from flops_ray.app.run import load_datasets
from flops_ray.studies.estimator_study import EstimatorStudy, cosine_sweep, plot_cosines, variance_ratio
from flops_ray.studies.job_cli import job_parser, run_main
from flops_ray.studies.results import write_result
from flops_ray.studies.shapes import SHAPES, write_shapes
from flops_ray.studies.table1 import (
    METHODS,
    Method,
    accuracy_summary,
    allocator_gains,
    budget_table,
    by_cell,
    spread,
    tables,
    timing_summary,
)
from flops_ray.studies.table1_plots import plot_figure5, plot_table1


@dataclass(frozen=True)
class BudgetStudy:
    """The default allocator at a fraction of equal allocation's budget, paired by seed (digits, LR)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 300
    """Longer than Table 1's runs: the gain of allocation grows as easy samples become easy."""
    fraction: float = 0.75
    """The default's budget relative to equal's ``queries_per_sample``."""


QUICK_BUDGET = BudgetStudy(seeds=(0, 1), steps=2)


@dataclass(frozen=True)
class ReproduceConfig:
    """What the reproduction runs."""

    datasets: tuple[str, ...] = ("digits", "shapes")
    """``digits`` (built in) and ``shapes`` (generated, written as Parquet by the image-folder converter)."""
    methods: tuple[Method, ...] = METHODS
    """Table 1's rows."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Root seeds; each gives its own pretrained body, fresh head, batch order and noise."""
    model: str = "digits_vit_pretrained"
    """Model every run fine-tunes (the digits ViT pretrained by backprop on digits 0-4, fresh head)."""
    steps: int = 150
    """Optimizer steps per run."""
    batch_size: int = 32
    """Data points per step."""
    queries_per_sample: int = 16
    """Mean queries per data point and layer group for every forward method but MeZO."""
    eval_every: int = 25
    """Test accuracy every this many steps (the curves of ``table1.png``)."""
    shard_cost: int = 256
    """Forward passes per in-process call: larger than the farm's default, since nothing crosses a wire."""
    shapes_train: int = 1500
    """Generated training images (classes in turn)."""
    shapes_test: int = 375
    """Generated test images."""
    figure4: EstimatorStudy = field(
        default_factory=lambda: EstimatorStudy(queries=(4, 8, 16, 32, 64, 128), cosine_reps=3)
    )
    """The estimator benchmark's sweep (its own seed, digits batch and layers)."""


QUICK = ReproduceConfig(
    # The unpretrained digits ViT: its backprop pretraining would dominate a quick run (Figure 4 still pays one).
    model="digits_vit",
    steps=2,
    batch_size=16,
    queries_per_sample=4,
    eval_every=1,
    shapes_train=160,
    shapes_test=40,
    figure4=EstimatorStudy(
        queries=(4, 8),
        layers=(("late", "blocks.3.mlp.fc2"),),
        cosine_reps=2,
        variance_reps=4,
        variance_queries=8,
        trace_pilot=8,
    ),
)


def run_config(
    rc: ReproduceConfig, method: Method, dataset: str, num_classes: int, seed: int, budget: int | None = None
) -> TrainConfig:
    """The training config of one Table 1 cell: flops_ray's defaults (no pilot, traces from the clean pass)
    with the method's estimator and budget (``budget`` overrides the shared queries per sample)."""
    base = TrainConfig()
    backprop = method.estimator == "bp"
    est = EstimatorConfig(kind="lr" if backprop else method.estimator)
    if budget is None:
        budget = est.floor if method.least_budget else rc.queries_per_sample
    return base.replace(
        model=rc.model,
        data=DataConfig(dataset=dataset, num_classes=num_classes),
        backprop=backprop,
        groups=tuple(dataclasses.replace(g, queries_per_sample=budget) for g in base.groups),
        estimator=est,
        allocator=AllocatorConfig(kind=method.allocator),
        farm=FarmConfig(backend="local", shard_cost=rc.shard_cost),
        batch_size=rc.batch_size,
        steps=rc.steps,
        seed=seed,
        eval_every=rc.eval_every,
    ).validate()


def train_once(cfg: TrainConfig) -> dict:
    """Train one config in-process; its final test accuracy, accuracy curve, allocation spread and step timings."""
    t0 = time.perf_counter()
    model = create_model(cfg.model, cfg.data.num_classes, cfg.data.img_size, cfg.seed)
    train, test = load_datasets(cfg.data, model)
    with Trainer(cfg, model, train, test) as trainer:
        logs = trainer.fit()

    def median(field: str, first: int = 0) -> float:
        # Medians: the machine's 2 cores are shared, and a neighbour's burst should not move a step's cost.
        return float(np.median([getattr(log, field) for log in logs[first:] or logs]))

    return {
        "accuracy": logs[-1].accuracy,
        "curve": [[log.step + 1, log.accuracy] for log in logs if log.accuracy is not None],
        "queries_per_step": int(np.mean([log.queries for log in logs])),
        # Per group: how uneven the allocation was, against the spread Neyman's A_j ~ sqrt(T_j) would give.
        "count_cv": [spread([log.counts[g].astype(float) for log in logs]) for g in range(len(logs[0].counts))],
        "sqrt_trace_cv": [spread([np.sqrt(log.traces[g]) for log in logs]) for g in range(len(logs[0].traces))],
        "step_seconds": median("seconds"),
        "allocator_seconds": median("allocator_seconds"),
        "fit_seconds": median("fit_seconds", first=1),  # a step reports the fit it adopted: step 0 has none
        "wall_seconds": time.perf_counter() - t0,
    }


def table1(rc: ReproduceConfig, data_dir: Path) -> list[dict]:
    """Train every (seed, dataset, method), printing a line per run; the runs' records (:mod:`flops_ray.studies.table1`)."""
    unknown = sorted(set(rc.datasets) - {"digits", "shapes"})
    if unknown:
        raise ValueError(f"datasets: unknown {unknown}; known: digits, shapes")
    datasets = {
        name: (str(write_shapes(data_dir, rc.shapes_train, rc.shapes_test)), len(SHAPES))
        if name == "shapes"
        else (name, 10)
        for name in rc.datasets
    }
    runs: list[dict] = []
    total = len(rc.seeds) * len(datasets) * len(rc.methods)
    # Seeds outermost: the pretrained body is cached per seed in-process, so each seed pretrains once.
    for seed in rc.seeds:
        for name, (path, classes) in datasets.items():
            for method in rc.methods:
                run = train_once(run_config(rc, method, path, classes, seed))
                runs.append({"dataset": name, "method": method.name, "seed": seed, **run})
                print(
                    f"[{len(runs)}/{total}] {name} {method.name} seed {seed}: accuracy {run['accuracy']:.3f}, "
                    f"{run['step_seconds']:.3f} s/step, {run['wall_seconds']:.0f} s",
                    flush=True,
                )
    return runs


def budget_study(rc: ReproduceConfig, study: BudgetStudy) -> dict:
    """Equal allocation at the full budget against the default allocator at ``fraction`` of it, per seed."""
    small = round(rc.queries_per_sample * study.fraction / 2) * 2
    arms = {
        "equal": (Method("LR", "lr"), rc.queries_per_sample),
        "default": (Method("Neyman-LR", "lr", "neyman"), small),
    }
    runs = []
    for seed in study.seeds:
        for arm, (method, budget) in arms.items():
            cfg = run_config(rc, method, "digits", 10, seed, budget).replace(steps=study.steps)
            run = train_once(cfg)
            runs.append({"arm": arm, "seed": seed, "queries_per_sample": budget, **run})
            print(f"budget {arm} ({budget} queries/sample) seed {seed}: accuracy {run['accuracy']:.3f}", flush=True)
    acc = {(r["arm"], r["seed"]): r["accuracy"] for r in runs}
    diff = np.array([acc["default", s] - acc["equal", s] for s in study.seeds])
    return {
        "config": {"reproduce": dataclasses.asdict(rc), "budget": dataclasses.asdict(study)},
        "queries_per_sample": {arm: budget for arm, (_, budget) in arms.items()},
        "accuracy_mean": {arm: float(np.mean([acc[arm, s] for s in study.seeds])) for arm in arms},
        "difference": {"per_seed": diff.tolist(), "mean": float(diff.mean()), "std": float(diff.std(ddof=1))},
        "runs": runs,
    }


def main(rc: ReproduceConfig, out: Path) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print(f"figure 4: cosine sweep on digits ({len(rc.figure4.queries)} budgets)", flush=True)
    cosine = cosine_sweep(rc.figure4)
    ratio = variance_ratio(rc.figure4)
    plot_cosines(cosine, out / "figure4.png")
    figure4_seconds = time.perf_counter() - t0
    print(f"table 1: {len(rc.methods)} methods x {len(rc.datasets)} datasets x {len(rc.seeds)} seeds", flush=True)
    with tempfile.TemporaryDirectory(prefix="reproduce-data-") as data_dir:
        runs = table1(rc, Path(data_dir))
    cells = by_cell(runs)
    summary = {d: {m: accuracy_summary(rs) for m, rs in methods.items()} for d, methods in cells.items()}
    gains = allocator_gains(runs, rc.methods)
    figure5 = {d: {m: timing_summary(rs) for m, rs in methods.items()} for d, methods in cells.items()}
    plot_table1(runs, out / "table1.png")
    plot_figure5(figure5, out / "figure5.png")
    result = {
        "config": dataclasses.asdict(rc),
        "table1": summary,
        "ranking": {d: sorted(row, key=lambda m: -row[m]["accuracy_mean"]) for d, row in summary.items()},
        "allocator_gains": gains,
        "figure4": {"cosine": cosine, "variance_ratio": ratio},
        "figure5": figure5,
        "runs": runs,
        "seconds": {"figure4": figure4_seconds, "total": time.perf_counter() - t0},
    }
    path = write_result(out, "reproduce", result)
    print("\n\n".join(tables(result)))
    print(f"wrote {path} in {result['seconds']['total']:.0f} s", flush=True)
    return result


def main_budget(rc: ReproduceConfig, study: BudgetStudy, out: Path) -> dict:
    """The budget study alone: writes ``budget.json`` and prints its table."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"budget: {len(study.seeds)} seeds x 2 arms, {study.steps} steps", flush=True)
    result = budget_study(rc, study)
    write_result(out, "budget", result)
    print(budget_table(result))
    return result


if __name__ == "__main__":
    parser = job_parser(__doc__, "reproduce", "tiny budgets and steps, under a minute on 2 cores")
    parser.add_argument(
        "--part",
        choices=("tables", "budget"),
        default="tables",
        help="tables: Table 1 and Figures 4-5 (reproduce.json); budget: the fewer-queries study (budget.json)",
    )

    def _main(args) -> None:
        rc = QUICK if args.quick else ReproduceConfig()
        if args.part == "budget":
            main_budget(rc, QUICK_BUDGET if args.quick else BudgetStudy(), args.out)
        else:
            main(rc, args.out)

    run_main(parser, _main)
