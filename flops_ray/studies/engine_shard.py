"""One replica's engine holding a batch and one main shard planned as a training step plans it, to be timed.

The engine benchmark times such a shard against plain inference of the same rows, under variants of the
engine's settings (prefix sharing, noise layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flops_ray.config import TrainConfig
from flops_ray.estimators import RowPlan, queries_per_draw
from flops_ray.messages import ShardTask
from flops_ray.models.losses import LossFn, cross_entropy
from flops_ray.replica.engine import QueryEngine
from flops_ray.step.checks import reuses_pilot
from flops_ray.step.plan import plan_clean, plan_main
from flops_ray.studies.batches import Batch, config_batch
from flops_ray.studies.local_replicas import query_engine
from flops_ray.studies.timing import seconds


@dataclass(frozen=True)
class Variant:
    """An estimator kind and the engine settings it is timed with."""

    kind: str
    share_prefix: bool = True
    """``estimator.share_prefix``."""
    noise: str = "gaussian"
    """``estimator.noise``."""

    def __str__(self) -> str:
        return " ".join(
            [self.kind, *([] if self.share_prefix else ["whole"]), *([self.noise] * (self.noise != "gaussian"))]
        )


def variants(kinds: tuple[str, ...]) -> list[Variant]:
    """Each kind as configured (the blocks before the group shared per sample), with every query through the
    whole model (``share_prefix`` off), and SPSA/ES also with rank-1 noise."""
    out = [Variant(k, share) for k in kinds for share in (True, False)]
    return out + [Variant(k, noise="rank1") for k in kinds if k != "lr"]


def engine_and_shard(
    cfg: TrainConfig,
    group: int,
    model: nn.Module,
    shard: int,
    where: torch.device,
    variant: Variant,
    loss_fn: LossFn = cross_entropy,
    batch: Callable[[int], Batch] | None = None,
    samples: int = 0,
) -> tuple[QueryEngine, ShardTask]:
    """An engine for ``variant`` on ``where`` holding a batch of ``samples`` (0: just enough for one main shard of
    ``shard`` queries of ``group``), and the step's first main shard of at most ``shard`` queries: clean pass, equal
    counts and the main plan as in a training step.

    ``loss_fn`` is the model's per-sample loss; ``batch(samples)`` makes the rows (default: :func:`config_batch`).
    """
    v = variant
    est = dataclasses.replace(cfg.estimator, kind=v.kind, share_prefix=v.share_prefix, noise=v.noise)
    pilot, per_sample = est.pilot_queries, cfg.groups[group].queries_per_sample
    reuse = reuses_pilot(est, cfg.allocator)
    samples = samples or -(-shard // (per_sample - (0 if reuse else pilot)))
    x, y, ids = batch(samples) if batch else config_batch(cfg, model, samples)
    engine = query_engine(model, cfg.groups, est, cfg.seed, where, loss_fn)
    engine.set_batch(0, x, y)
    losses = np.concatenate([engine.run(t).losses for t in plan_clean(0, ids, cfg.farm.shard_cost)])
    counts = np.full(samples, per_sample)
    return engine, plan_main(0, group, counts, ids, losses, pilot, shard, queries_per_draw(est), reuse)[0]


def shard_rows(engine: QueryEngine, task: ShardTask) -> RowPlan:
    """The rows ``task`` evaluates on ``engine``: batch positions, items and draw keys."""
    return RowPlan.of(task, queries_per_draw(engine.est), engine.root_seed, engine.device)


def infer(engine: QueryEngine, inputs: torch.Tensor, rows: RowPlan) -> None:
    """Plain batched inference of the shard's ``inputs`` on the engine's model, in its chunks and precision."""
    with torch.inference_mode(), engine.forward_precision():
        for sl in rows.chunks(engine.est.max_rows):
            engine.model(inputs[sl])


def noise_seconds(engine: QueryEngine, task: ShardTask, reps: int) -> tuple[int, float]:
    """Gaussian numbers the engine's noise path makes for ``task``'s rows (``RowPlan.draws``, then each row's
    signed copy, chunk by chunk), and its seconds (median of ``reps``)."""
    rows = shard_rows(engine, task)
    layout = engine.estimators[task.group].noise_layout(engine.batch()[0])
    chunks = rows.chunks(engine.est.max_rows)
    times = [
        seconds(lambda: [rows.draws(sl, layout, engine.dtype).rows() for sl in chunks], engine.device)
        for _ in range(reps)
    ]
    return len(rows.keys) * layout.size, float(np.median(times))
