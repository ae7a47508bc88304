"""The engine benchmark's workloads: a shipped config's model and layer group, loaded as a replica would hold it.

A workload may put a causal LM (:mod:`flops_ray.studies.lm_bench`) in place of the config's model: saved once
by the caller (:func:`with_saved_lm`), loaded through ``hf:`` wherever the workload is (a fresh process
measuring peak memory too), with the LM's default groups, loss and random-token rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from flops_ray import TrainConfig, create_model, load_config
from flops_ray.app.job_config import jobs_dir
from flops_ray.app.run import fit_to_model
from flops_ray.models.hf import PREFIX
from flops_ray.studies.lm_bench import save_gpt2, token_batches


@dataclass(frozen=True)
class Workload:
    """A shipped config's model and layer group, and the main shard the engine is timed on."""

    config: str
    """Config YAML in ``jobs/configs``: model, layer groups, estimator settings, shard size."""
    group: str
    """Name of the layer group the shard perturbs."""
    kinds: tuple[str, ...]
    """Estimator kinds timed (the config's estimator settings, its kind replaced)."""
    model: str = ""
    """Model replacing the config's, with the same architecture (empty: the config's)."""
    shard: int = 0
    """Queries in the timed main shard (0: the config's ``farm.shard_cost``)."""
    reps: int = 5
    """Interleaved repetitions of inference and engine; the median ratio is reported."""
    precision: str = ""
    """``estimator.precision`` of both sides, plain inference under the same autocast (empty: the config's)."""
    lm: str = ""
    """A causal LM's shape (:data:`flops_ray.studies.lm_bench.SHAPES`) in place of the config's model, on random
    tokens (empty: the config's model and data); :func:`with_saved_lm` saves it and sets ``model``."""


def with_saved_lm(work: Workload, folder: Path) -> Workload:
    """``work`` with its causal LM (if any) saved in ``folder`` (weights from the config's seed) as its ``model``."""
    if not work.lm:
        return work
    seed = load_config(jobs_dir() / "configs" / work.config)[0].seed
    return replace(work, model=PREFIX + str(save_gpt2(work.lm, seed, folder)))


def load_workload(work: Workload) -> tuple[TrainConfig, int, nn.Module, dict]:
    """The workload's config (a causal LM's with its default groups), the index of its group, its model
    (initialised from the config's seed) and the engine's arguments for it: its loss and, for an LM, its rows."""
    cfg, _ = load_config(jobs_dir() / "configs" / work.config)
    cfg = cfg.replace(model=work.model or cfg.model)
    if work.precision:
        cfg = cfg.replace(estimator=dataclasses.replace(cfg.estimator, precision=work.precision))
    model = create_model(cfg.model, cfg.data.num_classes, cfg.data.img_size, cfg.seed)
    cfg, loss_fn = fit_to_model(cfg, model)
    group = [g.name for g in cfg.groups].index(work.group)
    batch = token_batches(work.lm, model, cfg.seed) if work.lm else None
    return cfg, group, model, {"loss_fn": loss_fn, "batch": batch}
