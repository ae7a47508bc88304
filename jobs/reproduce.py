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

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from flops_ray.app.run import load_datasets
from flops_ray.config import AllocatorConfig, DataConfig, EstimatorConfig, FarmConfig, TrainConfig
from flops_ray.data.parquet import image_folder_to_parquet
from flops_ray.models.factory import create_model
from flops_ray.studies.estimator_study import EstimatorStudy, cosine_sweep, plot_cosines, variance_ratio
from flops_ray.training.trainer import Trainer

SHAPES = ("bar", "circle", "cross", "ring", "triangle")
"""Classes of the generated set, in label order (the image-folder converter sorts class names)."""


@dataclass(frozen=True)
class Method:
    """One row of Table 1."""

    name: str
    estimator: str
    """``bp`` (the backprop baseline: ``TrainConfig.backprop``), or an ``EstimatorConfig`` kind (``spsa``, ``lr``)."""
    allocator: str = "equal"
    """How each group's budget is split over the batch."""
    least_budget: bool = False
    """Spend one pair per data point (MeZO: 2 queries) instead of the shared budget."""
    baseline: str = ""
    """The equal-allocation row this one is compared with seed by seed (allocator gains); empty: none."""


METHODS = (
    Method("BP", "bp"),
    Method("MeZO", "spsa", least_budget=True),
    Method("n-SPSA", "spsa"),
    Method("LR", "lr"),
    Method("OPS-SPSA", "spsa", "gaussian", baseline="n-SPSA"),
    Method("OPS-LR", "lr", "gaussian", baseline="LR"),
    Method("Neyman-SPSA", "spsa", "neyman", baseline="n-SPSA"),
    Method("Neyman-LR", "lr", "neyman", baseline="LR"),
)


@dataclass(frozen=True)
class BudgetStudy:
    """The default allocator at a fraction of equal allocation's budget, paired by seed (digits, LR)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 300
    """Longer than Table 1's runs: the gain of allocation grows as easy samples become easy."""
    fraction: float = 0.75
    """The default's budget relative to equal's ``queries_per_sample``."""


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
    # The unpretrained digits ViT: the pretraining costs ~15 s per seed on 2 cores (Figure 4 still pays one).
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


# ---- the generated dataset ------------------------------------------------------------------------------
def draw_shape(kind: str, rng: np.random.Generator, side: int = 32) -> Image.Image:
    """One greyscale ``side`` px image of ``kind`` with random size, position, rotation, brightness and noise.

    Drawn at 32 px and shrunk (with antialiasing) to the model's 8 px by the Parquet reader, like the
    paper's images resized to the ViT's input.
    """
    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    r = rng.uniform(0.3, 0.45) * side
    cx, cy = side / 2 + rng.uniform(-0.12, 0.12, 2) * side
    angle = rng.uniform(0, 2 * math.pi)
    fill = int(rng.uniform(150, 255))
    width = max(2, int(rng.uniform(0.12, 0.2) * side))

    def spoke(a: float) -> list[tuple[float, float]]:
        return [(cx - r * math.cos(a), cy - r * math.sin(a)), (cx + r * math.cos(a), cy + r * math.sin(a))]

    if kind == "bar":
        draw.line(spoke(angle), fill=fill, width=width)
    elif kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "cross":
        draw.line(spoke(angle), fill=fill, width=width)
        draw.line(spoke(angle + math.pi / 2), fill=fill, width=width)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    elif kind == "triangle":
        draw.polygon(
            [
                (cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
                for k in range(3)
            ],
            fill=fill,
        )
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")
    noisy = np.asarray(im, np.float32) + rng.normal(0.0, 10.0, (side, side))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_shapes(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Generate the shapes set as ``root/<split>/<class>/*.png`` and convert each split to Parquet.

    Returns:
        ``root/shapes_train.parquet``; its test split is the sibling ``shapes_test.parquet``.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            kind = SHAPES[i % len(SHAPES)]
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            draw_shape(kind, rng).save(folder / f"{i:05d}.png")
        image_folder_to_parquet(root / split, root / f"shapes_{split}.parquet")
    return root / "shapes_train.parquet"


# ---- Table 1 --------------------------------------------------------------------------------------------
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


def spread(values: list[np.ndarray]) -> float | None:
    """Mean over steps of the coefficient of variation (std / mean) of one group's per-sample values.

    None when the values are unknown (an allocator that read no finite traces).
    """
    if not all(np.isfinite(v).all() for v in values):
        return None
    return float(np.mean([v.std() / max(v.mean(), 1e-30) for v in values]))


def mean_per_group(rows: list[list[float | None]]) -> list[float | None]:
    """Per group, the mean over runs of a :func:`spread` (None where any run's is unknown)."""
    return [None if None in col else float(np.mean(col)) for col in zip(*rows)]


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


def by_cell(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Runs grouped by dataset, then method, in the order they ran."""
    cells: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        cells.setdefault(r["dataset"], {}).setdefault(r["method"], []).append(r)
    return cells


def accuracy_summary(runs: list[dict]) -> dict:
    """One Table 1 cell: test accuracy mean and sample std over its seeds, and per group the allocation's spread."""
    acc = np.array([r["accuracy"] for r in runs])
    return {
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "seeds": len(runs),
        "queries_per_step": runs[0]["queries_per_step"],
        **{k: mean_per_group([r[k] for r in runs]) for k in ("count_cv", "sqrt_trace_cv")},
    }


def allocator_gains(runs: list[dict], methods: tuple[Method, ...]) -> dict:
    """Accuracy of each allocator row minus its equal-allocation baseline, seed by seed.

    A seed fixes the pretrained body, the head, the batches and the noise of every query index, so the
    difference cancels the seed-to-seed spread that dominates Table 1's std.
    """
    acc = {(r["dataset"], r["method"], r["seed"]): r["accuracy"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    gains: dict[str, dict] = {}
    for d in dict.fromkeys(r["dataset"] for r in runs):
        for m in methods:
            if m.baseline:
                diff = np.array([acc[d, m.name, s] - acc[d, m.baseline, s] for s in seeds])
                gains.setdefault(d, {})[m.name] = {
                    "baseline": m.baseline,
                    "mean": float(diff.mean()),
                    "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                    "per_seed": diff.tolist(),
                }
    return gains


def timing_summary(runs: list[dict]) -> dict:
    """One Figure 5 bar: per-step seconds (each run's median, averaged over seeds).

    The Gaussian allocator's fit runs in a thread beside the step's queries (in-process as on the farm), so
    ``step_seconds`` holds only what the step waited for it; ``fit_seconds`` is the fit's own time.
    """
    return {k: float(np.mean([r[k] for r in runs])) for k in ("step_seconds", "allocator_seconds", "fit_seconds")}


def table1(rc: ReproduceConfig, data_dir: Path) -> list[dict]:
    """Train every (seed, dataset, method), printing a line per run; the runs' records."""
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


QUICK_BUDGET = BudgetStudy(seeds=(0, 1), steps=2)


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


def markdown(cells: dict, cell: Callable[[dict], str]) -> str:
    """A Markdown table of ``{dataset: {method: stats}}``: a row per method, ``cell(stats)`` per dataset."""
    names = list(cells)
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method in cells[names[0]]:
        lines.append(f"| {method} | " + " | ".join(cell(cells[n][method]) for n in names) + " |")
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------------------
def plot_table1(runs: list[dict], path: Path) -> None:
    """Test accuracy against the step, mean over seeds with a ±1 std band, one panel per dataset."""
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    fig = Figure(figsize=(6 * len(datasets), 4.2))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, name in zip(axes, datasets):
        for method in dict.fromkeys(r["method"] for r in runs):
            curves = np.array([r["curve"] for r in runs if (r["dataset"], r["method"]) == (name, method)])
            steps, acc = curves[0, :, 0], curves[:, :, 1]
            line = ax.plot(steps, acc.mean(0), marker="o", markersize=3, label=method)[0]
            ax.fill_between(
                steps, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=line.get_color(), alpha=0.12
            )
        ax.set(title=name, xlabel="step", ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_figure5(figure5: dict, path: Path) -> None:
    """Seconds per step, split into queries and allocator sampling, beside the Gaussian fit's, per dataset."""
    datasets = list(figure5)
    fig = Figure(figsize=(6 * len(datasets), 4.2))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, name in zip(axes, datasets):
        methods = list(figure5[name])
        cells = [figure5[name][m] for m in methods]
        fit = np.array([c["fit_seconds"] for c in cells])
        alloc = np.array([c["allocator_seconds"] for c in cells])
        rest = np.array([c["step_seconds"] for c in cells]) - alloc
        at = np.arange(len(methods))
        ax.bar(at - 0.2, rest, width=0.4, label="clean pass, queries, update")
        ax.bar(at - 0.2, alloc, width=0.4, bottom=rest, label="allocation sampling")
        ax.bar(at + 0.2, fit, width=0.4, hatch="//", label="gaussian fit (in a thread beside the step)")
        ax.set_xticks(at, methods)
        ax.set(title=name, ylabel="seconds per step (median over steps)")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- the job --------------------------------------------------------------------------------------------
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
    (out / "reproduce.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n\n".join(tables(result)))
    print(f"wrote {out / 'reproduce.json'} in {result['seconds']['total']:.0f} s", flush=True)
    return result


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def tables(result: dict) -> list[str]:
    """The Markdown tables docs/RESULTS.md shows, from a ``reproduce.json``: accuracy (Table 1), allocator
    gains, allocation spread (counts' CV / sqrt-traces' CV per group) and seconds per step (Figure 5)."""
    summary = result["table1"]
    return [
        markdown(summary, lambda c: f"{100 * c['accuracy_mean']:.1f} ± {100 * c['accuracy_std']:.1f}"),
        markdown(
            result["allocator_gains"], lambda c: f"{100 * c['mean']:+.1f} ± {100 * c['std']:.1f} vs {c['baseline']}"
        ),
        markdown(
            summary, lambda c: ", ".join(f"{a:.2f} / {_num(t)}" for a, t in zip(c["count_cv"], c["sqrt_trace_cv"]))
        ),
        markdown(result["figure5"], lambda c: f"{c['step_seconds']:.3f} (fit {c['fit_seconds']:.3f})"),
    ]


def budget_table(budget: dict) -> str:
    """The budget study as a Markdown table: each arm's queries and mean accuracy, and the paired difference."""
    diff = budget["difference"]
    rows = [
        f"| {arm} | {budget['queries_per_sample'][arm]} | {100 * budget['accuracy_mean'][arm]:.1f} |"
        for arm in ("equal", "default")
    ]
    return "\n".join(
        [
            "| arm | queries per sample and group | test accuracy (mean over seeds) |",
            "|---|---|---|",
            *rows,
            f"| default - equal, paired by seed | | {100 * diff['mean']:+.1f} ± {100 * diff['std']:.1f} |",
        ]
    )


def main_budget(rc: ReproduceConfig, study: BudgetStudy, out: Path) -> dict:
    """The budget study alone: writes ``budget.json`` and prints its table."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"budget: {len(study.seeds)} seeds x 2 arms, {study.steps} steps", flush=True)
    result = budget_study(rc, study)
    (out / "budget.json").write_text(json.dumps(result, indent=2) + "\n")
    print(budget_table(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budgets and steps, under a minute on 2 cores")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output directory")
    parser.add_argument(
        "--part",
        choices=("tables", "budget"),
        default="tables",
        help="tables: Table 1 and Figures 4-5 (reproduce.json); budget: the fewer-queries study (budget.json)",
    )
    args = parser.parse_args()
    rc = QUICK if args.quick else ReproduceConfig()
    if args.part == "budget":
        main_budget(rc, QUICK_BUDGET if args.quick else BudgetStudy(), args.out)
    else:
        main(rc, args.out)
