"""Peak memory of one alignment step's work, per method, at the run's batch and model (Figure 5's memory side).

Forward-only methods: one replica's engine holding the batch, running the step's first shard of ``farm.shard_cost``
queries (a replica runs a step's queries shard by shard), its clean pass done. Backprop: the forward and
backward of the batch through the LM to the adapter. Each counts the tensors the work holds at once beyond the frozen
weights and the batch, which every method holds alike (:func:`~flops_ray.studies.peak_memory.tensor_peak_bytes`).
"""

from __future__ import annotations

import torch

from flops_ray.app.align import CaptionData, method_config
from flops_ray.config import TrainConfig
from flops_ray.config.align import AlignSettings
from flops_ray.data.arrays import batch_at
from flops_ray.models.aligner import AlignedLM
from flops_ray.models.losses import completion_loss
from flops_ray.step.backprop import model_input
from flops_ray.studies.engine_shard import Variant, engine_and_shard
from flops_ray.studies.peak_memory import tensor_peak_bytes


def step_peak_bytes(method: str, cfg: TrainConfig, settings: AlignSettings, model: AlignedLM, data: CaptionData) -> int:
    """Bytes of tensors ``method``'s work on the first step's batch holds at once (see the module docstring)."""
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(where)
    ids = batch_at(len(data.train), cfg.batch_size, cfg.seed, 0)
    x, y = data.train.x[ids], data.train.y[ids]
    run = method_config(cfg, method, settings)
    if run.backprop:
        model.adapter.requires_grad_(True)
        inputs, targets = model_input(model, x).to(where), torch.from_numpy(y).to(where)
        return tensor_peak_bytes(lambda: completion_loss(model(inputs), targets).mean().backward(), where)
    engine, task = engine_and_shard(
        run,
        0,
        model,
        run.farm.shard_cost,
        where,
        Variant(run.estimator.kind),
        completion_loss,
        lambda n: (x[:n], y[:n], ids[:n]),
        samples=len(ids),
    )
    return tensor_peak_bytes(lambda: engine.run(task), where)
