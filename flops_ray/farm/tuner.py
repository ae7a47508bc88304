"""Ray Tune over training runs: each trial is a run with its own farm, its resources one placement group.

The trial's bundles are its driver (the trainable itself) and one per replica (:func:`trial_resources`); Tune
places the trainable in the first and, capturing child tasks, the run's replica actors in the others, so
concurrent trials never share a farm. The run itself comes from above as a function
(:data:`TrialRun`): this module knows Ray Tune, not training.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from flops_ray.config import FarmConfig
from flops_ray.config.search import SearchSpec
from flops_ray.farm.placement import replica_demand
from flops_ray.farm.ray_init import ray_session

TrialRun = Callable[[dict[str, Any], Callable[[dict[str, float]], None], str], None]
"""``run(values, report, trial_id)``: train one trial with the searched ``values`` (key -> value), calling
``report(metrics)`` at every evaluation; ``trial_id`` names its output directory and stays the same when an
interrupted search resumes."""
SCHEDULERS = ("asha", "fifo")
"""``asha`` stops the trials behind at each rung (Li et al. 2020); ``fifo`` runs every trial to its end."""


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial ended (its state is saved: ``resume`` continues it)."""


@dataclass(frozen=True)
class TrialResult:
    """One trial as the search ended."""

    trial_id: str
    values: dict[str, Any]
    """The searched keys' values."""
    metrics: dict[str, Any]
    """Its last report (empty if it reported nothing)."""
    error: str | None
    """Why it failed (None: it finished, or the scheduler stopped it)."""


def domain(spec: SearchSpec) -> Any:
    """The Tune search domain of ``spec``."""
    kinds = {
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return kinds[spec.kind](spec.values)


def trial_resources(farm: FarmConfig, driver_cpus: float = 1.0) -> tune.PlacementGroupFactory:
    """One trial's placement group: its driver's bundle, then one bundle per replica slot (``farm.max_replicas``;
    none in-process)."""
    bundles = [{"CPU": driver_cpus}]
    if farm.backend == "ray":
        bundles += [replica_demand(farm)] * farm.max_replicas
    return tune.PlacementGroupFactory(bundles, strategy="PACK")


def run_search(
    run: TrialRun,
    specs: list[SearchSpec],
    *,
    trials: int,
    storage: Path,
    metric: str,
    mode: str,
    resources: tune.PlacementGroupFactory,
    farm: FarmConfig,
    rungs: int,
    scheduler: str = "asha",
    seed: int = 0,
    resume: bool = False,
) -> list[TrialResult]:
    """Run ``trials`` trials of ``run`` over ``specs`` with Ray Tune, results under ``storage/tune``.

    Args:
        run: one trial's run.
        specs: the searched keys.
        trials: samples of the search space (each ``grid`` multiplies them).
        storage: the output directory (Tune's experiment goes in ``storage/tune``).
        metric, mode: what the scheduler compares (``accuracy``, ``max``).
        resources: one trial's placement group (:func:`trial_resources`).
        farm: where Ray is (``farm.address``, else ``RAY_ADDRESS``, else a local Ray sized for one trial).
        rungs: reports a trial makes at most (ASHA's ``max_t``).
        scheduler: one of :data:`SCHEDULERS`.
        seed: the search's random state.
        resume: continue the search in ``storage/tune`` if one is there (its unfinished and failed trials
            run again; a trial's run resumes from its own checkpoint).
    """
    cpus = sum(b.get("CPU", 0) for b in resources.bundles)
    with ray_session(farm, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus))):
        have = ray.cluster_resources().get("CPU", 0)
        if cpus > have:
            # On a cluster that autoscales, nodes may yet come; on a fixed one no trial would ever start.
            print(
                f"warning: a trial needs {cpus:g} CPUs (its driver and {len(resources.bundles) - 1} replicas) and the "
                f"cluster has {have:g}: trials wait until nodes join (or lower farm.replicas / num_cpus_per_replica)",
                flush=True,
            )
        trainable = tune.with_resources(_trainable(run), resources)
        path = storage.resolve() / "tune"
        if resume and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = _new_tuner(trainable, specs, path, trials, metric, mode, scheduler, rungs, seed)
        before = signal.getsignal(signal.SIGINT)
        grid = tuner.fit()
        if _caught_interrupt(before):
            raise SearchInterrupted(f"the search in {path} stopped with unfinished trials: --resume continues it")
        return [
            TrialResult(
                trial_id=str((r.metrics or {}).get("trial_id", "")),
                values=dict(r.config or {}),
                metrics={k: v for k, v in (r.metrics or {}).items() if k in {metric, "accuracy", "loss", "step"}},
                error=None if r.error is None else f"{type(r.error).__name__}: {r.error}",
            )
            for r in grid
        ]


def _new_tuner(
    trainable: Any,
    specs: list[SearchSpec],
    path: Path,
    trials: int,
    metric: str,
    mode: str,
    scheduler: str,
    rungs: int,
    seed: int,
) -> tune.Tuner:
    """A new search in ``path``: ``trials`` samples of ``specs``, the random state ``seed``, ASHA (``max_t``:
    ``rungs`` reports) or FIFO."""
    chosen = (
        ASHAScheduler(time_attr="training_iteration", max_t=max(rungs, 1), grace_period=1, reduction_factor=2)
        if scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space={s.key: domain(s) for s in specs},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=trials,
            scheduler=chosen,
            search_alg=BasicVariantGenerator(random_state=seed),
        ),
        run_config=tune.RunConfig(storage_path=str(path.parent), name=path.name, verbose=1),
    )


def _caught_interrupt(before: Any) -> bool:
    """Whether ``Tuner.fit`` returned because of a Ctrl-C, given the SIGINT handler before it ran.

    In the main thread fit installs its own handler, which stops the search (saving its state, marking every
    trial terminated) and puts ``before`` back; without a Ctrl-C it stays in place. Either way ``before`` is
    the handler again afterwards.
    """
    if threading.current_thread() is not threading.main_thread() or int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")
    ):
        return False
    caught = signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, before)
    return caught


def _trainable(run: TrialRun) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable of ``run``: reports go to ``tune.report``."""

    def trainable(values: dict[str, Any]) -> None:
        run(values, tune.report, tune.get_context().get_trial_id())

    return trainable
