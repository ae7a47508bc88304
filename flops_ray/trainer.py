"""The trainer: forward-only steps (any estimator x allocator) or backprop, then a torch optimizer.

The backend is a config choice (``farm.backend``); the trainer's code is the same for both.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flops_ray.allocators import create_allocator
from flops_ray.config import TrainConfig
from flops_ray.data import ArrayDataset, batch_at
from flops_ray.engine import LossFn, QueryEngine, cross_entropy
from flops_ray.step import Backend, StepReport, forward_step


@dataclass
class StepLog:
    """One step's metrics, as logged."""

    step: int
    loss: float
    queries: int
    seconds: float
    allocator_seconds: float
    """Sampling allocations (on the step's critical path)."""
    counts: list[np.ndarray]
    traces: list[np.ndarray]
    losses: np.ndarray | None = None
    """``(B,)`` per-sample clean losses of the step's batch."""
    skipped: int = 0
    """Queries dropped for non-finite losses (``estimator.on_nonfinite = "skip"``)."""
    fit_seconds: float = 0.0
    """Fitting allocator state for the next step, overlapped with the step's queries on the farm."""
    accuracy: float | None = None


@torch.no_grad()
def accuracy(model: nn.Module, data: ArrayDataset, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    model.eval()
    correct = 0
    for s in range(0, len(data), batch):
        logits = model(torch.from_numpy(np.ascontiguousarray(data.x[s : s + batch])))
        correct += int((logits.argmax(-1).numpy() == data.y[s : s + batch]).sum())
    return correct / len(data)


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names over ``params``."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


class Trainer:
    """Forward-only training of ``model`` on ``train`` with the estimator and allocator of ``cfg``.

    Args:
        cfg: the run's configuration (validated here).
        model: the model; the trainer keeps the master copy and replicas get copies.
        train: training data.
        test: held-out data for accuracy (optional).
        loss_fn: per-sample loss.
        backend_factory: builds the backend from a template engine (defaults from ``cfg.farm``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train: ArrayDataset,
        test: ArrayDataset | None = None,
        loss_fn: LossFn = cross_entropy,
        backend_factory: Callable[[TrainConfig, QueryEngine], Backend] | None = None,
    ):
        self.cfg = cfg.validate()
        self.model = model.eval()
        self.train_set, self.test_set = train, test
        self.loss_fn = loss_fn
        # The master engine binds groups to the master model; replicas evaluate copies of it.
        self.engine = QueryEngine(model, cfg.groups, cfg.estimator, cfg.seed, loss_fn)
        self.params = self.engine.trainable()
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.sizes = [g.size for g in self.engine.groups]
        self.optimizer = make_optimizer(cfg, self.params)
        self.allocators = [create_allocator(cfg.allocator) for _ in cfg.groups]
        self.step_count = 0
        self.backend: Backend | None = None
        if cfg.estimator.kind != "bp":
            factory = backend_factory or default_backend
            self.backend = factory(cfg, self.engine)

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> StepLog:
        """One optimizer step on the next batch of the deterministic order."""
        ids = batch_at(len(self.train_set), self.cfg.batch_size, self.cfg.seed, self.step_count)
        x, y = self.train_set.x[ids], self.train_set.y[ids]
        t0 = time.perf_counter()
        if self.backend is None:
            report = self._backprop(x, y)
        else:
            grads, report = forward_step(
                self.backend,
                step=self.step_count,
                params=self.engine.get_params().numpy(),
                x=x,
                y=y,
                sample_ids=ids,
                groups=self.cfg.groups,
                sizes=self.sizes,
                estimator=self.cfg.estimator,
                allocators=self.allocators,
                shard_cost=self.cfg.farm.shard_cost,
                root_seed=self.cfg.seed,
            )
            self._apply(grads)
        self.optimizer.step()
        self.step_count += 1
        return StepLog(
            step=report.step,
            loss=report.clean_loss,
            queries=report.queries,
            seconds=time.perf_counter() - t0,
            allocator_seconds=report.allocator_seconds,
            counts=report.counts,
            traces=report.traces,
            losses=report.losses,
            skipped=report.skipped,
            fit_seconds=report.fit_seconds,
        )

    def _apply(self, grads: list[np.ndarray]) -> None:
        for g, grad in zip(self.engine.groups, grads):
            flat = torch.from_numpy(grad)
            if self.cfg.grad_clip > 0:
                norm = flat.norm()
                if norm > self.cfg.grad_clip:
                    flat = flat * (self.cfg.grad_clip / norm)
            offset = 0
            for _, p in g.params:
                p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
                offset += p.numel()

    def _backprop(self, x: np.ndarray, y: np.ndarray) -> StepReport:
        self.optimizer.zero_grad()
        with torch.enable_grad():
            losses = self.loss_fn(self.model(torch.from_numpy(x)), torch.from_numpy(y))
            losses.mean().backward()
        if self.cfg.grad_clip > 0:
            for g in self.engine.groups:
                torch.nn.utils.clip_grad_norm_([p for _, p in g.params], self.cfg.grad_clip)
        return StepReport(self.step_count, losses.mean().item(), losses.detach().numpy())

    # ---- loops and evaluation -----------------------------------------------------------------------
    def evaluate(self, data: ArrayDataset | None = None) -> float:
        """Accuracy of the master model on ``data`` (the test set by default)."""
        data = data or self.test_set
        if data is None:
            raise ValueError("no test set to evaluate on")
        return accuracy(self.model, data)

    def fit(self, steps: int | None = None, callback: Callable[[StepLog], None] | None = None) -> list[StepLog]:
        """Run ``steps`` steps (default ``cfg.steps`` minus those done), evaluating every ``cfg.eval_every``."""
        target = self.cfg.steps if steps is None else self.step_count + steps
        logs = []
        while self.step_count < target:
            log = self.step()
            every = self.cfg.eval_every
            if self.test_set is not None and (self.step_count == target or (every and self.step_count % every == 0)):
                log.accuracy = self.evaluate()
            logs.append(log)
            if callback:
                callback(log)
        return logs

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_backend(cfg: TrainConfig, engine: QueryEngine) -> Backend:
    """The backend ``cfg.farm.backend`` names; replicas get copies of the engine's model."""
    if cfg.farm.backend == "ray":
        from flops_ray.farm.backend import RayBackend

        return RayBackend(cfg, engine.model, engine.loss_fn)
    from flops_ray.local_backend import LocalBackend

    replica = QueryEngine(copy.deepcopy(engine.model), cfg.groups, cfg.estimator, cfg.seed, engine.loss_fn)
    return LocalBackend(replica)
