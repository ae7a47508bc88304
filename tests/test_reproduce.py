"""``jobs/reproduce.py --quick`` runs end to end as a script and writes the JSON and plots the reproduction promises.

The figures themselves come from the full run in docs/results/; this run only proves the script works.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

# The reproduction job in a subprocess, 48 training runs: slow.
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
METHODS = ["BP", "MeZO", "n-SPSA", "LR", "OPS-SPSA", "OPS-LR", "Neyman-SPSA", "Neyman-LR"]
DATASETS = ["digits", "shapes"]
SEEDS = 3
ALLOCATORS = {"equal", "bernoulli", "gaussian", "neyman"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory, run_script) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("reproduce")
    proc = run_script("jobs/reproduce.py", "--quick", "--out", str(out))
    return json.loads((out / "reproduce.json").read_text()), out, proc.stdout


def test_table1_has_every_method_and_dataset_with_sane_statistics(quick):
    result, _, _ = quick
    table = result["table1"]
    assert list(table) == DATASETS
    for dataset, cells in table.items():
        assert list(cells) == METHODS, dataset
        for method, cell in cells.items():
            where = f"{dataset}/{method}"
            assert cell["seeds"] >= SEEDS, where
            # Quick runs are too short to judge accuracy: the cell must be the statistics of its own runs.
            accs = [r["accuracy"] for r in result["runs"] if (r["dataset"], r["method"]) == (dataset, method)]
            assert cell["accuracy_mean"] == pytest.approx(float(np.mean(accs))), where
            assert cell["accuracy_std"] == pytest.approx(float(np.std(accs, ddof=1))), where
        assert sorted(result["ranking"][dataset]) == sorted(METHODS)


def test_allocator_gains_are_seed_by_seed_differences(quick):
    result, _, _ = quick
    runs = {(r["dataset"], r["method"], r["seed"]): r["accuracy"] for r in result["runs"]}
    baselines = {"OPS-SPSA": "n-SPSA", "OPS-LR": "LR", "Neyman-SPSA": "n-SPSA", "Neyman-LR": "LR"}
    for dataset in DATASETS:
        gains = result["allocator_gains"][dataset]
        assert {m: g["baseline"] for m, g in gains.items()} == baselines
        for method, gain in gains.items():
            diffs = [runs[dataset, method, s] - runs[dataset, gain["baseline"], s] for s in range(SEEDS)]
            assert gain["per_seed"] == pytest.approx(diffs)
            assert gain["mean"] == pytest.approx(sum(diffs) / SEEDS) and math.isfinite(gain["std"])


def test_figure5_times_every_method(quick):
    result, _, _ = quick
    assert list(result["figure5"]) == DATASETS
    for dataset, bars in result["figure5"].items():
        assert list(bars) == METHODS, dataset
        for method, bar in bars.items():
            where = f"{dataset}/{method}"
            assert bar["step_seconds"] > 0 and bar["allocator_seconds"] >= 0 and bar["fit_seconds"] >= 0, where
            # Quick runs take 2 steps, whose median is their mean: sampling is part of the step.
            assert bar["allocator_seconds"] <= bar["step_seconds"], where
        assert bars["BP"]["fit_seconds"] == 0, dataset
        # Equal allocation has nothing to fit (its timer brackets a no-op); the gaussian fits lambda every step.
        assert bars["LR"]["fit_seconds"] < bars["OPS-LR"]["fit_seconds"], dataset


def test_every_run_is_recorded_and_the_summary_is_its_mean(quick):
    result, _, _ = quick
    runs = result["runs"]
    assert len(runs) == len(DATASETS) * len(METHODS) * SEEDS
    assert {(r["dataset"], r["method"], r["seed"]) for r in runs} == {
        (d, m, s) for d in DATASETS for m in METHODS for s in range(SEEDS)
    }
    for r in runs:
        assert r["curve"][-1] == [result["config"]["steps"], r["accuracy"]]
    cell = result["table1"]["shapes"]["OPS-LR"]
    accs = [r["accuracy"] for r in runs if (r["dataset"], r["method"]) == ("shapes", "OPS-LR")]
    assert cell["accuracy_mean"] == pytest.approx(sum(accs) / len(accs))


def _committed() -> dict:
    return json.loads((ROOT / "docs/results/reproduce.json").read_text())


@pytest.mark.parametrize("which", ["quick", "committed"])
def test_budgets_match_the_methods(request, which):
    """Checked on the committed full run too, so a results file older than the methods fails here."""
    result = request.getfixturevalue("quick")[0] if which == "quick" else _committed()
    for cells in result["table1"].values():
        assert cells["BP"]["queries_per_step"] == 0
        shared = {cells[m]["queries_per_step"] for m in METHODS if m not in ("BP", "MeZO")}
        assert len(shared) == 1, "every forward method but MeZO spends the same queries per step"
        per_sample = result["config"]["queries_per_sample"]
        assert cells["MeZO"]["queries_per_step"] == shared.pop() * 2 // per_sample, "MeZO: one pair"
        assert cells["MeZO"]["count_cv"] == [0.0, 0.0], "MeZO allocates equally"
        assert cells["BP"]["count_cv"] == [] and cells["LR"]["count_cv"] == [0.0, 0.0], "equal allocation is even"
        assert len(cells["OPS-LR"]["count_cv"]) == len(cells["OPS-LR"]["sqrt_trace_cv"]) == 2
        assert all(v >= 0 and math.isfinite(v) for v in cells["Neyman-LR"]["sqrt_trace_cv"])


def test_figure4_sweeps_every_allocator(quick):
    result, _, _ = quick
    rows = result["figure4"]["cosine"]
    assert {r["allocator"] for r in rows} == ALLOCATORS
    # A quick sweep's cosines are noise-dominated: plumbing only (the full run's are in docs/RESULTS.md).
    assert all(math.isfinite(r["cosine"]) for r in rows)
    ratio = result["figure4"]["variance_ratio"]
    assert 0 < ratio["predicted"] <= 1.0 + 1e-9 and ratio["measured"] > 0


def test_plots_and_progress(quick):
    _, out, stdout = quick
    for name in ("table1.png", "figure4.png", "figure5.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert f"[{len(DATASETS) * len(METHODS) * SEEDS}/" in stdout
    assert "| OPS-LR |" in stdout


def test_results_doc_shows_the_committed_full_run(monkeypatch):
    """docs/RESULTS.md shows the tables of the committed reproduce.json, which is a run of the default config."""
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import reproduce

    result = _committed()
    assert result["config"] == json.loads(json.dumps(dataclasses.asdict(reproduce.ReproduceConfig())))
    doc = (ROOT / "docs/RESULTS.md").read_text()
    assert "python jobs/reproduce.py --out docs/results" in doc
    for table in reproduce.tables(result):
        assert table in doc, table
    figures = re.findall(r"\]\((results/[^)]+)\)", doc)
    assert {"results/table1.png", "results/figure4.png", "results/figure5.png"} <= set(figures)
    assert all((ROOT / "docs" / f).is_file() for f in figures)


def test_budget_study_is_paired_by_seed(tmp_path, run_script):
    run_script("jobs/reproduce.py", "--quick", "--part", "budget", "--out", str(tmp_path))
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert budget["queries_per_sample"] == {"equal": 4, "default": 4}  # quick: 75% of 4, rounded to a pair
    acc = {(r["arm"], r["seed"]): r["accuracy"] for r in budget["runs"]}
    seeds = budget["config"]["budget"]["seeds"]
    assert budget["difference"]["per_seed"] == pytest.approx([acc["default", s] - acc["equal", s] for s in seeds])


def test_results_doc_shows_the_committed_allocation_and_budget_runs(monkeypatch):
    """docs/RESULTS.md shows the tables of the committed bench_allocation.json and budget.json."""
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import bench_allocation
    import reproduce

    doc = (ROOT / "docs/RESULTS.md").read_text()
    allocation = json.loads((ROOT / "docs/results/bench_allocation.json").read_text())
    assert bench_allocation.table(allocation["checkpoints"]) in doc
    assert allocation["default_allocator"] == "neyman/clean"
    budget = json.loads((ROOT / "docs/results/budget.json").read_text())
    assert reproduce.budget_table(budget) in doc
    assert budget["config"]["budget"] == json.loads(json.dumps(dataclasses.asdict(reproduce.BudgetStudy())))
