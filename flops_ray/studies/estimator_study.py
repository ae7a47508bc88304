"""The estimator study behind ``jobs/bench_estimator.py`` and ``jobs/reproduce.py`` (paper Figure 4 at small scale).

1. Cosine between the estimated and the backprop gradient of one layer against queries per data point,
   for equal, bernoulli, gaussian and neyman allocation, LR and SPSA, an early and a late layer.
2. Mean squared error of the batch gradient under neyman vs equal allocation at the same budget,
   measured over repetitions with fresh noise, against the ratio ``J(neyman) / J(equal)`` predicted
   from pilot trace estimates (Theorem 1: the MSE is ``(1/B^2) sum_j T_j / A_j``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flops_ray.allocation.allocators import AllocationFeatures, create_allocator
from flops_ray.allocation.budget import allocation_objective
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import AllocatorConfig, EstimatorConfig, GroupConfig
from flops_ray.data.arrays import batch_at, digits
from flops_ray.messages import ShardItem, ShardTask, TaskKind
from flops_ray.models.factory import create_model
from flops_ray.models.losses import cross_entropy
from flops_ray.replica.engine import QueryEngine
from flops_ray.step.forward import ForwardStep
from flops_ray.step.plan import plan_clean
from flops_ray.studies.local_replicas import local_backend, query_engine


@dataclass(frozen=True)
class EstimatorStudy:
    """What the benchmark sweeps."""

    queries: tuple[int, ...] = (4, 8, 16, 32, 64)
    """Mean queries per data point."""
    layers: tuple[tuple[str, str], ...] = (("early", "blocks.0.mlp.fc2"), ("late", "blocks.3.mlp.fc2"))
    """(label, module) pairs; each is a one-module layer group."""
    estimators: tuple[str, ...] = ("lr", "spsa")
    allocators: tuple[str, ...] = ("equal", "bernoulli", "gaussian", "neyman")
    batch_size: int = 16
    """Data points per estimate."""
    cosine_reps: int = 3
    """Independent estimates averaged per cosine point."""
    variance_reps: int = 300
    """Fresh-noise repetitions per allocation for the MSE ratio."""
    variance_queries: int = 16
    """Mean queries per data point in the MSE comparison."""
    trace_pilot: int = 64
    """Pilot queries per sample behind the predicted ratio."""
    sigma: float = 0.01
    seed: int = 0


QUICK = EstimatorStudy(queries=(4, 16, 64), cosine_reps=4, variance_reps=120, trace_pilot=48)


def _setup(bench: EstimatorStudy, module: str, estimator: str):
    model = create_model("digits_vit_pretrained", 10, 8, bench.seed)
    group = GroupConfig("layer", (module,), bench.sigma, 4)
    est = EstimatorConfig(kind=estimator, trace_coords=2048)
    engine = query_engine(model, (group,), est, bench.seed)
    train = digits("train")
    ids = batch_at(len(train), bench.batch_size, bench.seed, 0)
    x, y = train.x[ids], train.y[ids]
    params = [p for _, p in engine.groups[0].params]
    for p in model.parameters():
        p.requires_grad_(p in set(params))
    loss = cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).mean()
    true = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double().numpy()
    return engine, group, est, (x, y, ids), true


def cosine_sweep(bench: EstimatorStudy) -> list[dict]:
    """Cosine to backprop for every (estimator, allocator, queries, layer)."""
    rows = []
    samples = len(digits("train"))  # the trace memory's size (one per dataset index)
    for estimator in bench.estimators:
        for label, module in bench.layers:
            engine, group, est, (x, y, ids), true = _setup(bench, module, estimator)
            backend = local_backend(copy.deepcopy(engine.model), (group,), est, bench.seed)
            for alloc in bench.allocators:
                alloc_cfg = AllocatorConfig(kind=alloc)
                for q in bench.queries:
                    step = ForwardStep(
                        backend,
                        groups=(GroupConfig("layer", (module,), bench.sigma, q),),
                        sizes=[engine.groups[0].size],
                        widths=[engine.groups[0].noise_width],
                        estimator=est,
                        allocator=alloc_cfg,
                        allocators=[create_allocator(alloc_cfg)],
                        memory=TraceMemory(1, samples),
                        shard_cost=64,
                        root_seed=bench.seed,
                    )
                    cos = []
                    for rep in range(bench.cosine_reps):
                        reduced, _ = step(rep, x, y, ids)
                        (grad,) = reduced.grads
                        cos.append(float(grad @ true / (np.linalg.norm(grad) * np.linalg.norm(true))))
                    rows.append(
                        {
                            "estimator": estimator,
                            "allocator": alloc,
                            "queries_per_sample": q,
                            "layer": label,
                            "cosine": float(np.mean(cos)),
                            # Standard error over the repetitions: "below equal beyond noise" is judged by it.
                            "cosine_se": float(np.std(cos, ddof=1) / np.sqrt(len(cos))) if len(cos) > 1 else None,
                        }
                    )
                    print(f"cosine {estimator:4s} {label:5s} {alloc:9s} q={q:3d}: {rows[-1]['cosine']:.3f}", flush=True)
    return rows


def _estimate(
    engine: QueryEngine, counts: np.ndarray, ids: np.ndarray, baselines: np.ndarray, offset: int
) -> np.ndarray:
    """One batch estimate ``(1/B) sum_j (1/A_j) sum_q G_jq`` with fresh queries starting at ``offset``."""
    b = len(ids)
    total = 0.0
    for j in range(b):
        item = ShardItem(j, int(ids[j]), offset, offset + int(counts[j]), float(baselines[j]))
        task = ShardTask(kind=TaskKind.MAIN, step=0, group=0, index=j, items=(item,), weights=(1.0 / (b * counts[j]),))
        total = total + engine.run(task).grad
    return total


def variance_ratio(bench: EstimatorStudy) -> dict:
    """Measured MSE(neyman) / MSE(equal) against the prediction from pilot traces (LR, late layer)."""
    module = bench.layers[-1][1]
    engine, _, _, (x, y, ids), true = _setup(bench, module, "lr")
    engine.set_params(engine.get_params())
    engine.set_batch(0, x, y)
    b = len(ids)
    (clean_task,) = plan_clean(0, ids, shard_cost=b)
    clean = engine.run(clean_task)
    items = tuple(ShardItem(j, int(ids[j]), 0, bench.trace_pilot, float(clean.losses[j])) for j in range(b))
    pilot = ShardTask(kind=TaskKind.PILOT, step=0, group=0, index=0, items=items)
    traces = torch.from_numpy(engine.run(pilot).traces)
    feats = AllocationFeatures(traces, torch.from_numpy(clean.losses), torch.from_numpy(clean.embeddings))
    total = bench.variance_queries * b
    counts = {
        kind: create_allocator(AllocatorConfig(kind=kind)).allocate(feats, total, 2, 2, torch.Generator()).numpy()
        for kind in ("equal", "neyman")
    }
    j = {k: allocation_objective(traces, torch.from_numpy(c).double()).item() for k, c in counts.items()}
    predicted = j["neyman"] / j["equal"]
    mse = {}
    for kind, c in counts.items():
        # Query indices past the pilot's: fresh, independent noise for every repetition.
        errs = [
            np.sum((_estimate(engine, c, ids, clean.losses, bench.trace_pilot + r * 4 * total) - true) ** 2)
            for r in range(bench.variance_reps)
        ]
        mse[kind] = float(np.mean(errs))
        print(f"mse {kind}: {mse[kind]:.4g} over {bench.variance_reps} reps", flush=True)
    measured = mse["neyman"] / mse["equal"]
    return {
        "predicted": predicted,
        "measured": measured,
        "relative_error": abs(measured - predicted) / predicted,
        "mse": mse,
        "counts": {k: c.tolist() for k, c in counts.items()},
        "traces": traces.tolist(),
    }


def plot_cosines(rows: list[dict], path: Path) -> None:
    """Cosine to backprop against queries per data point, one panel per (estimator, layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimators = sorted({r["estimator"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(
        len(estimators), len(layers), figsize=(5 * len(layers), 3.6 * len(estimators)), squeeze=False
    )
    for i, est in enumerate(estimators):
        for k, layer in enumerate(layers):
            ax = axes[i][k]
            for alloc in dict.fromkeys(r["allocator"] for r in rows):
                pts = [
                    (r["queries_per_sample"], r["cosine"])
                    for r in rows
                    if (r["estimator"], r["layer"], r["allocator"]) == (est, layer, alloc)
                ]
                ax.plot(*zip(*pts), marker="o", label=alloc)
            ax.set(
                title=f"{est.upper()}, {layer} layer",
                xlabel="queries per data point",
                ylabel="cosine to backprop",
                xscale="log",
            )
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
