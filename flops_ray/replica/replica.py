"""One model replica: a query engine, its own optimizer update and the version of its parameters.

Every replica applies the same :class:`~flops_ray.messages.StepUpdate` to its own copy, so the copies stay
identical without parameters travelling; a joining replica adopts a peer's
:class:`~flops_ray.messages.ReplicaState`. The in-process backend and the Ray actor both wrap this class.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flops_ray.config import EstimatorConfig, GroupConfig, TrainConfig, UpdateRule
from flops_ray.messages import ReplicaState, ShardResult, ShardTask, StepUpdate, TaskKey, TaskKind, UpdateSource
from flops_ray.models.groups import to_numpy
from flops_ray.models.losses import LossFn, cross_entropy
from flops_ray.replica.engine import QueryEngine
from flops_ray.replica.ordered_sum import AllGather
from flops_ray.replica.update import ParamUpdate


class ReplicaStateError(RuntimeError):
    """A replica was asked for work at another version of the parameters than the one it holds."""


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica is built from besides the model (small: it travels to every actor)."""

    groups: tuple[GroupConfig, ...]
    """Layer groups; their parameters are the trainable ones."""
    estimator: EstimatorConfig
    """Estimator settings."""
    root_seed: int
    """The run's root seed."""
    rule: UpdateRule = field(default_factory=UpdateRule)
    """The optimizer and clipping of :meth:`Replica.apply` (studies that never apply can leave the default)."""
    loss_fn: LossFn = cross_entropy
    """Per-sample loss ``(outputs (R, ...), targets (R,)) -> (R,)`` (a module-level function, so it pickles)."""

    @classmethod
    def of(cls, cfg: TrainConfig, loss_fn: LossFn = cross_entropy) -> ReplicaSpec:
        """The replicas of the run ``cfg``."""
        return cls(cfg.groups, cfg.estimator, cfg.seed, cfg.update_rule, loss_fn)


class Replica:
    """A copy of the model that evaluates shard tasks and applies each step's update to its own parameters.

    Args:
        model: the model (the replica moves it to ``device`` and owns it from then on).
        spec: groups, estimator, seed, update rule and loss.
        device: where the replica runs.
    """

    def __init__(self, model: nn.Module, spec: ReplicaSpec, device: str | torch.device = "cpu"):
        self.engine = QueryEngine(model, spec.groups, spec.estimator, spec.root_seed, spec.loss_fn, device)
        self.update = ParamUpdate([[p for _, p in g.params] for g in self.engine.groups], spec.rule)
        self.sizes = [g.size for g in self.engine.groups]
        self.version = 0
        """Updates applied to the parameters."""
        self._held: dict[TaskKey, torch.Tensor] = {}
        """All-reduce: each kept main task's ``(P_g,)`` float32 partial, apart, so the sum can follow task order."""
        self._reduced: list[torch.Tensor] | None = None
        self._applied: list[torch.Tensor] | None = None
        """The last all-reduced sums applied, float32 (the telemetry's cosine to the next step's); None after any
        other update, or in a replica that joined since."""

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def sync(self, step: int, x: np.ndarray, y: np.ndarray, version: int | None = None) -> None:
        """Load the step's batch and forget the previous step's partial sums; with ``version``, first check the
        replica holds the parameters after that many updates (one that missed an update adopts a peer's state)."""
        if version is not None and self.version != version:
            raise ReplicaStateError(f"replica holds update {self.version} of the parameters, step needs {version}")
        with _read_only_arrays():
            self.engine.set_batch(step, x, y)
        self._held = {}
        self._reduced = None

    def run(self, task: ShardTask, keep: bool = False, coefficients: bool = False) -> ShardResult:
        """Evaluate ``task``; with ``keep`` a main task's gradient partial stays here for a collective sum
        (:meth:`partials`), with ``coefficients`` it travels as per-draw coefficients (the scalar protocol)."""
        if not (keep and task.kind == TaskKind.MAIN):
            return self.engine.run(task, coefficients)
        result, grad = self.engine.run_on_device(task)
        self._held[task.key] = grad  # kept apart: summed in task order with every replica's (ordered_sum)
        return result

    # ---- collective reduction -----------------------------------------------------------------------
    def partials(self) -> dict[TaskKey, torch.Tensor]:
        """The kept tasks' ``(P_g,)`` float32 partials by task key, on the device (a failed collective leaves
        them intact)."""
        return dict(self._held)

    def hold_reduced(self, grads: list[torch.Tensor]) -> tuple[float, ...]:
        """Keep the collective's per-group ``(P_g,)`` float64 sums for an update from ``HELD``; returns their L2
        norms."""
        self._reduced = grads
        return tuple(float(g.norm()) for g in self._reduced)

    def replay_reduced(self, update: StepUpdate, rank: int, world: int, exchange: AllGather) -> tuple[float, ...]:
        """Sliced replay: rebuild this member's share of ``update``'s gradient (``COEFS``), gather the others' and
        keep the sums for an update from ``HELD`` (:meth:`hold_reduced`); returns their norms."""
        return self.hold_reduced(self.engine.replay(update.tasks, update.coefs, rank, world, exchange))

    def cosines(self) -> tuple[float, ...]:
        """Per group, the cosine between the held sums and the last sums this replica applied (NaN where it
        applied none or either is zero): the telemetry's cosine between consecutive estimates, where the driver
        never sees them."""
        if self._reduced is None or self._applied is None:
            return tuple(float("nan") for _ in self.sizes)
        out = []
        for new, old in zip(self._reduced, self._applied):
            scale = float(new.norm() * old.norm())
            out.append(float(new.float() @ old) / scale if scale > 0 else float("nan"))
        return tuple(out)

    # ---- the replica's own copy of the training state -----------------------------------------------
    def apply(self, update: StepUpdate) -> tuple[float, ...]:
        """Apply ``update`` to the parameters (once: a repeat is ignored); returns the group norms."""
        if self.version == update.version + 1:
            return ()
        if self.version != update.version:
            raise ReplicaStateError(f"replica holds update {self.version}, the update applies to {update.version}")
        if update.source == UpdateSource.HELD:
            if self._reduced is None:
                raise ReplicaStateError("no all-reduced gradient to apply: this replica was not in the collective")
            grads = self._reduced
        elif update.source == UpdateSource.GRADS:
            grads = [torch.from_numpy(np.asarray(g)).to(self.device) for g in update.grads]
        else:
            grads = self.engine.replay(update.tasks, update.coefs)
        norms = self.update.apply(grads)
        self.version += 1
        self._applied = [g.float() for g in grads] if update.source == UpdateSource.HELD else None
        self._reduced = None
        return tuple(norms)

    def export_state(self) -> ReplicaState:
        """A copy of the parameters and the optimizer state, on the CPU."""
        opt = _cpu_copy(self.update.state_dict())
        return ReplicaState(self.version, to_numpy(self.engine.get_params()), opt)

    def adopt(self, state: ReplicaState) -> int:
        """Take over ``state`` (a peer's, or a checkpoint's); returns its version."""
        with _read_only_arrays():
            self.engine.set_params(state.params)
        self.update.load_state_dict(state.optimizer)
        self.version = state.version
        return self.version

    def digest(self) -> tuple[int, str]:
        """The version and a hash of the parameters (copies that drifted hash differently)."""
        return self.version, self.update.digest()


@contextlib.contextmanager
def _read_only_arrays() -> Iterator[None]:
    """Silence torch's warning on read-only arrays: object-store arrays are read-only views, which the engine
    copies and never writes to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        yield


def _cpu_copy(obj):
    """``obj`` with every tensor in it copied to the CPU: the optimizer keeps updating its own in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    return obj
