"""The benchmark scripts run end to end on tiny configs and write the JSON their issues specify.

The figures themselves come from ``--quick`` and full runs (docs); these runs only prove the scripts work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# bench_farm starts its own local Ray: private HOME and RAY_TMPDIR, loopback, no auth (conftest.ray_env).
pytestmark = pytest.mark.usefixtures("ray_env")

ROOT = Path(__file__).resolve().parents[1]


def _run_tiny(script: str, config: str, out: Path) -> dict:
    """Run ``jobs/<script>``'s ``main`` with a tiny ``BenchConfig(...)`` in a fresh interpreter."""
    code = (
        "import runpy, sys; from pathlib import Path; "
        f"job = runpy.run_path('jobs/{script}', run_name='bench'); "
        f"job['main'](job['BenchConfig']({config}), Path(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / script.replace(".py", ".json")).read_text())


def test_bench_estimator_tiny(tmp_path):
    result = _run_tiny(
        "bench_estimator.py",
        "queries=(4, 8), layers=(('late', 'blocks.3.mlp.fc2'),), estimators=('lr',), "
        "allocators=('equal', 'neyman'), cosine_reps=2, variance_reps=4, variance_queries=8, trace_pilot=8",
        tmp_path,
    )
    rows = result["cosine"]
    assert {(r["allocator"], r["queries_per_sample"]) for r in rows} == {
        (a, q) for a in ("equal", "neyman") for q in (4, 8)
    }
    assert all(-1.0 <= r["cosine"] <= 1.0 and r["cosine_se"] >= 0 for r in rows)
    ratio = result["variance_ratio"]
    assert 0 < ratio["predicted"] <= 1.0 + 1e-9 and ratio["measured"] > 0  # neyman minimises J: predicted <= 1
    assert (tmp_path / "bench_estimator.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_farm_tiny(tmp_path):
    result = _run_tiny(
        "bench_farm.py",
        "workers=(1,), batch_size=8, queries_per_sample=8, shard_cost=32, spread=10.0, reps=1, train_steps=1",
        tmp_path,
    )
    assert set(result["efficiency"]) == set(result["blackbox_efficiency"]) == {"1"}
    assert all(v > 0 for v in (*result["efficiency"].values(), *result["blackbox_efficiency"].values()))
    assert result["makespan_ratio"]["dynamic"] > 0 and result["makespan_ratio"]["static"] > 0
    assert 0 <= result["allocator_overhead"] < 1
    # Parameters out and gradient sums back (~17k float64 each), batch and messages: well under 1 MB.
    # Shipping the step's LR noise instead (B * q * 2 groups * 17 tokens * 64 floats) would not be.
    assert 0 < result["bytes_per_step_per_worker"] < 1e6
