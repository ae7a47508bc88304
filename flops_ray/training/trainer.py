"""The trainer: the step loop around one step object, forward-only (any estimator x allocator) or backprop.

:func:`make_step` builds the step object the config asks for, and the trainer drives either through the same
interface (:class:`~flops_ray.step.interface.TrainStep`). The backend is a config choice (``farm.backend``);
the trainer's code is the same for both. Where the step's parameters live elsewhere (the replicas of
forward-only training), the trainer's model is refreshed from them only when it is read (an evaluation,
a checkpoint, :meth:`Trainer.get_params`). The trainer owns its resumable state (:meth:`Trainer.state_dict`);
the checkpointer only writes files.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flops_ray.allocation.allocators import create_allocator
from flops_ray.allocation.trace_memory import TraceMemory
from flops_ray.config import TrainConfig
from flops_ray.config.plain import config_to_dict
from flops_ray.data.arrays import ArrayDataset, batch_at
from flops_ray.messages import ReplicaState
from flops_ray.models.groups import flatten, to_numpy
from flops_ray.models.losses import LossFn, cross_entropy
from flops_ray.replica.replica import Replica, ReplicaSpec
from flops_ray.replica.threads import replica_threads
from flops_ray.replica.update import make_optimizer
from flops_ray.step.backend import Backend
from flops_ray.step.backprop import model_input
from flops_ray.step.checks import check_config
from flops_ray.step.forward import ForwardStep
from flops_ray.step.interface import StepReport
from flops_ray.step.local_backend import LocalBackend
from flops_ray.training.checkpoint import read_checkpoint, save_checkpoint
from flops_ray.training.state import CheckpointError, TrainState, check_resumable
from flops_ray.training.steps import BackendFactory, make_step, trained_groups


class StopTraining(Exception):
    """Raised by a step hook to end :meth:`Trainer.fit` after the current step (a clean stop, not an error)."""


StepHook = Callable[["Trainer", StepReport], None]
"""Called by :meth:`Trainer.fit` after every step (and its evaluation, if any) with the step's report."""


def accuracy(model: nn.Module, data: ArrayDataset, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data``, or the model's own ``accuracy(x, y) -> (B,) bool`` where it has one
    (a causal LM's choice accuracy or greedy exact match)."""
    model.eval()
    correct = 0
    for s in range(0, len(data), batch):
        x, y = model_input(model, data.x[s : s + batch]), data.y[s : s + batch]
        if hasattr(model, "accuracy"):
            correct += int(model.accuracy(x, torch.from_numpy(y)).sum())
        else:
            correct += int((model(x).argmax(-1).numpy() == y).sum())
    return correct / len(data)


def default_backend(cfg: TrainConfig, model: nn.Module, loss_fn: LossFn) -> Backend:
    """The backend ``cfg.farm.backend`` names; replicas get copies of ``model``."""
    if cfg.farm.backend == "ray":
        from flops_ray.farm.backend import RayBackend

        return RayBackend(cfg, model, loss_fn)
    threads = cfg.farm.local_threads or replica_threads(cfg.farm.num_cpus_per_replica)
    return LocalBackend(Replica(copy.deepcopy(model), ReplicaSpec.of(cfg, loss_fn)), threads)


class Trainer:
    """Training of ``model`` on ``train``: forward-only with the estimator and allocator of ``cfg``, or backprop.

    Args:
        cfg: the run's configuration (validated here).
        model: the model; the trainer keeps the master copy and replicas get copies.
        train: training data.
        test: held-out data for accuracy (optional).
        loss_fn: per-sample loss.
        backend_factory: builds the backend (defaults from ``cfg.farm``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train: ArrayDataset,
        test: ArrayDataset | None = None,
        loss_fn: LossFn = cross_entropy,
        backend_factory: BackendFactory | None = None,
    ):
        self.cfg = check_config(cfg)
        self._model = model.eval()
        self.train_set, self.test_set = train, test
        self.loss_fn = loss_fn
        self.groups = trained_groups(cfg, model)
        self.params = [p for g in self.groups for _, p in g.params]
        for p in self._model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        # Backprop steps it; forward-only training keeps it as the checkpoint's copy of the replicas' optimizer.
        self.optimizer = make_optimizer(cfg.update_rule, self.params)
        self.allocators = [create_allocator(cfg.allocator) for _ in cfg.groups]
        self.memory = TraceMemory(len(cfg.groups), len(train), cfg.allocator.memory_decay, cfg.allocator.memory_prior)
        self.step_count = 0
        self._pulled = 0
        """The step at which the model (and optimizer) here last matched the ones that step."""
        self.train_step = make_step(
            cfg,
            model,
            self.groups,
            self.optimizer,
            self.allocators,
            self.memory,
            loss_fn,
            backend_factory or default_backend,
        )

    @property
    def forward_step(self) -> ForwardStep | None:
        """The forward-only step, None in backprop training (benches and tests read its allocator fit)."""
        return self.train_step if isinstance(self.train_step, ForwardStep) else None

    @property
    def backend(self) -> Backend | None:
        """Where the queries run, None in backprop training (which runs none)."""
        forward = self.forward_step
        return None if forward is None else forward.backend

    @property
    def model(self) -> nn.Module:
        """The model with the current parameters (in forward-only training, fetched from the replicas when
        they have stepped since the last read)."""
        self._pull()
        return self._model

    def get_params(self) -> np.ndarray:
        """``(P,)`` trainable parameters, group by group, as the replicas hold them (bfloat16 ones as float32,
        which numpy lacks)."""
        self._pull()
        return self._master_params()

    def _master_params(self) -> np.ndarray:
        return to_numpy(flatten([p.detach() for p in self.params]))

    def _pull(self) -> None:
        """Bring the model and optimizer here up to the ones that step (once per step read)."""
        if self._pulled != self.step_count:
            self.train_step.copy_to(self.params, self.optimizer)
            self._pulled = self.step_count

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> StepReport:
        """One optimizer step on the next batch of the deterministic order."""
        ids = batch_at(len(self.train_set), self.cfg.batch_size, self.cfg.seed, self.step_count)
        x, y = self.train_set.x[ids], self.train_set.y[ids]
        t0 = time.perf_counter()
        _, report = self.train_step(self.step_count, x, y, ids)
        report.applied(self.train_step.apply() or (math.nan,) * len(self.groups), self.cfg.grad_clip)
        self.step_count += 1
        report.seconds = time.perf_counter() - t0
        return report

    @property
    def consistent(self) -> bool:
        """Whether the state is that of a whole number of steps (False if a step was cut off while being
        applied): only then may it be saved. A step that fails before it is applied changes nothing."""
        return not self.train_step.committing

    # ---- loops and evaluation -----------------------------------------------------------------------
    def evaluate(self, data: ArrayDataset | None = None) -> float:
        """Accuracy of the master model on ``data`` (the test set by default)."""
        data = data or self.test_set
        if data is None:
            raise ValueError("no test set to evaluate on")
        self._pull()
        return accuracy(self._model, data)

    def fit(self, steps: int | None = None, hooks: Sequence[StepHook] = ()) -> list[StepReport]:
        """Run ``steps`` steps (default: up to ``cfg.steps``), evaluating every ``cfg.eval_every`` and at the end;
        afterwards the model passed to the trainer holds the trained parameters.

        Every hook is called after each step with the trainer and the step's report (metrics logs,
        progress lines and checkpoints are hooks), so the loop is written once. A hook that raises
        :class:`StopTraining` ends the loop after that step; the reports so far are returned.
        """
        target = self.cfg.steps if steps is None else self.step_count + steps
        reports = []
        every = self.cfg.eval_every
        while self.step_count < target:
            report = self.step()
            failed = None
            if self.test_set is not None and (self.step_count == target or (every and self.step_count % every == 0)):
                try:
                    report.accuracy = self.evaluate()
                except Exception as exc:  # the step is done: its hooks (metrics rows) still run, then the error
                    failed = exc
            reports.append(report)
            try:
                for hook in hooks:
                    hook(self, report)
            except StopTraining:
                break
            if failed is not None:
                raise failed
        self._pull()  # the model passed in holds the trained parameters when fit returns
        return reports

    # ---- resumable state ----------------------------------------------------------------------------
    def state_dict(self) -> TrainState:
        """Everything needed to continue this run exactly."""
        self._pull()
        self.train_step.settle()
        return TrainState(
            step=self.step_count,
            config=config_to_dict(self.cfg),
            model=self._model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            allocators=[a.state_dict() for a in self.allocators],
            memory=self.memory.state_dict(),
        )

    def load_state_dict(self, state: TrainState, where: str = "state") -> int:
        """Continue from ``state`` (same config up to run length, logging and farm); returns the step.

        Raises:
            CheckpointError: another config, model, optimizer state or allocator count.
        """
        check_resumable(state, self.cfg, self._model, self.params, where)
        self.train_step.discard()  # first: a load that fails part-way must not let background state land later
        if len(state.allocators) != len(self.allocators):
            raise CheckpointError(
                f"{where} holds {len(state.allocators)} allocator states, the trainer has {len(self.allocators)}"
            )
        try:
            self.optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{where}: optimizer state does not fit the trainer's optimizer ({exc})") from exc
        for g, (alloc, alloc_state) in enumerate(zip(self.allocators, state.allocators)):
            try:
                alloc.load_state_dict(alloc_state)
            except ValueError as exc:
                raise CheckpointError(f"{where}: allocator state of group {g} does not fit ({exc})") from exc
        try:
            self.memory.load_state_dict(state.memory)
        except ValueError as exc:
            raise CheckpointError(f"{where}: trace memory does not fit ({exc})") from exc
        with torch.no_grad():
            self._model.load_state_dict(state.model)
        self.step_count = self._pulled = state.step
        self.train_step.load_state(ReplicaState(state.step, self._master_params(), self.optimizer.state_dict()))
        return self.step_count

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint of this run to ``path`` (atomically)."""
        return save_checkpoint(self.state_dict(), path)

    def resume(self, path: str | Path) -> int:
        """Continue from the checkpoint at ``path``; returns the step it continues from."""
        return self.load_state_dict(read_checkpoint(path), where=f"checkpoint {path}")

    def close(self) -> None:
        self.train_step.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
