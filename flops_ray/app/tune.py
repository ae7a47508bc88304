"""Hyper-parameter search over runs with Ray Tune: ``flops-ray tune`` and ``flops_ray.tune``.

    flops-ray tune --config jobs/configs/digits_ops_lr.yaml --search lr=loguniform:1e-4:1e-1 \\
        --search groups.0.sigma=choice:1e-3,1e-2 --trials 8 --out runs/tune

Each trial is a run of :func:`~flops_ray.app.run.train` (the config with the trial's values as ``--set``
overrides) in ``OUT/trials/<trial id>``, with its own farm (:func:`~flops_ray.farm.tuner.trial_resources`), and
reports every evaluation to Tune; ASHA stops the trials behind. ``OUT/trials.json`` holds every trial's values and
last report, ``OUT/best.yaml`` the best trial's config, which ``flops-ray train --config OUT/best.yaml`` runs as
is. An interrupted search continues with ``--resume``: Tune's unfinished trials run again, each resuming its run
from its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from flops_ray.app.job_config import load_config, quick_config
from flops_ray.app.run import train
from flops_ray.config import ConfigError
from flops_ray.config.plain import config_to_dict, plain
from flops_ray.config.search import SearchSpec, parse_search
from flops_ray.files import write_text
from flops_ray.seeding import STREAM_TUNE, derive_seed

QUICK_TRIALS = 4
QUICK_SEARCH = ("lr=loguniform:1e-3:1e-2", "groups.0.sigma=choice:0.02,0.05")
"""``--quick`` without ``--search``: two keys of the default digits run."""
BEST = "best.yaml"
TRIALS = "trials.json"


def _assignment(key: str, value: Any) -> str:
    """``key=value`` as ``--set`` reads it (the value as YAML; JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def _trial_run(config: str | None, sets: list[str], out: Path, quick: bool) -> Callable:
    """One trial's run: the config with the trial's values, trained in ``out/trials/<trial id>``; every evaluation
    (a step with a test accuracy) is reported, with the step's training loss."""

    def run(values: dict[str, Any], report: Callable[[dict[str, float]], None], trial_id: str) -> None:
        cfg, job = load_config(config, [*sets, *(_assignment(k, v) for k, v in values.items())])

        def report_evaluation(trainer, step_report) -> None:
            if step_report.accuracy is not None:
                report({"accuracy": step_report.accuracy, "loss": step_report.loss, "step": step_report.step})

        train(cfg, out / "trials" / trial_id, job, quick=quick, resume=True, hooks=[report_evaluation])

    return run


def best_config(config: str | None, sets: Sequence[str], values: dict[str, Any]) -> dict[str, Any]:
    """The full config (``job:`` included) of the trial with ``values``: what ``best.yaml`` holds."""
    cfg, job = load_config(config, [*sets, *(_assignment(k, v) for k, v in values.items())])
    return {**config_to_dict(cfg), "job": plain(dataclasses.replace(job, out=""))}


def tune(
    config: str | Path | None = None,
    search: Sequence[str] = (),
    trials: int = 8,
    out: str | Path = "runs/tune",
    *,
    sets: Sequence[str] = (),
    metric: str = "accuracy",
    mode: str = "max",
    scheduler: str = "asha",
    quick: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Search ``config``'s keys with Ray Tune, a run per trial, and write ``out/best.yaml`` and ``out/trials.json``.

    Args:
        config: the config YAML (None: the built-in defaults).
        search: ``KEY=KIND:ARGS`` specs (:mod:`flops_ray.config.search`), e.g. ``lr=loguniform:1e-4:1e-1``.
        trials: samples of the search space.
        out: output directory.
        sets: ``--set`` overrides applied to every trial.
        metric, mode: what decides the best trial (``accuracy``/``max`` or ``loss``/``min``).
        scheduler: ``asha`` (stop the trials behind) or ``fifo``.
        quick: tiny trials (:func:`~flops_ray.app.job_config.quick_config`); without ``search``, :data:`QUICK_SEARCH`
            over :data:`QUICK_TRIALS` trials.
        resume: continue an interrupted search in ``out``.

    Returns:
        ``{"best": values, "metric": ..., "trials": [...], "best_config": path}``.

    Raises:
        ConfigError: a bad spec, key or setting (checked before Ray starts).
    """
    try:
        from flops_ray.farm.tuner import SCHEDULERS, run_search, trial_resources
    except ImportError as exc:  # ray without its tune extra's packages
        raise ImportError(f"flops-ray tune needs pip install 'flops_ray[tune]' ({exc})") from exc

    if quick and not search:
        search, trials = QUICK_SEARCH, min(trials, QUICK_TRIALS)
    specs = _checked(search, metric, mode, scheduler, SCHEDULERS)
    config = None if config is None else str(Path(config).resolve())
    out = Path(out).resolve()
    # Every searched key must be a key of the config: a run with each spec's first value proves it before Ray starts.
    cfg, _ = load_config(config, [*sets, *(_assignment(s.key, _first(s)) for s in specs)])
    if quick:
        cfg, _ = quick_config(cfg, load_config(config, list(sets))[1])
    out.mkdir(parents=True, exist_ok=True)
    results = run_search(
        _trial_run(config, list(sets), out, quick),
        specs,
        trials=trials,
        storage=out,
        metric=metric,
        mode=mode,
        resources=trial_resources(cfg.farm),
        farm=cfg.farm,
        rungs=cfg.steps // cfg.eval_every + 1,
        scheduler=scheduler,
        seed=derive_seed(cfg.seed, STREAM_TUNE),
        resume=resume,
    )
    return write_results(out, results, metric, mode, best_config_of=lambda values: best_config(config, sets, values))


def write_results(
    out: Path, results: list, metric: str, mode: str, best_config_of: Callable[[dict], dict]
) -> dict[str, Any]:
    """Write ``out/trials.json`` (every trial) and ``out/best.yaml`` (the config ``best_config_of`` gives for the
    best trial's values, opening with the command that trains it); returns the summary.

    Raises:
        RuntimeError: no trial reported ``metric``.
    """
    rows = [dataclasses.asdict(r) for r in results]
    scored = [r for r in results if metric in r.metrics]
    if not scored:
        write_text(out / TRIALS, json.dumps({"trials": rows}, indent=2, default=str) + "\n")
        raise RuntimeError(f"no trial reported {metric}; see {out / TRIALS} and {out / 'tune'}")
    best = (max if mode == "max" else min)(scored, key=lambda r: r.metrics[metric])
    summary = {"metric": metric, "mode": mode, "best": best.values, "best_trial": best.trial_id, "trials": rows}
    write_text(out / TRIALS, json.dumps(summary, indent=2, default=str) + "\n")
    command = f"# flops-ray train --config {out / BEST}\n# The best of {len(results)} trials of flops-ray tune"
    text = yaml.safe_dump(best_config_of(best.values), sort_keys=False)
    write_text(out / BEST, f"{command} ({metric} {best.metrics[metric]:.4g}): {best.values}\n{text}")
    print(f"best of {len(results)} trials: {metric} {best.metrics[metric]:.4g} with {best.values} -> {out / BEST}")
    return {**summary, "best_config": str(out / BEST)}


def _checked(search: Sequence[str], metric: str, mode: str, scheduler: str, schedulers: tuple) -> list[SearchSpec]:
    """The parsed specs, once the search's settings are known to make sense.

    Raises:
        ConfigError: naming the option.
    """
    if not search:
        raise ConfigError("--search: give at least one KEY=KIND:ARGS, e.g. lr=loguniform:1e-4:1e-1")
    if mode not in ("max", "min") or metric not in ("accuracy", "loss"):
        raise ConfigError(f"--metric/--mode: accuracy/max or loss/min, got {metric}/{mode}")
    if scheduler not in schedulers:
        raise ConfigError(f"--scheduler: one of {list(schedulers)}, got {scheduler!r}")
    return [parse_search(s) for s in search]


def _first(spec: SearchSpec) -> Any:
    """A value ``spec`` may take (its first, or its lower bound)."""
    return spec.values[0]
