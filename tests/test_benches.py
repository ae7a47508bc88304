"""The benchmark scripts run end to end on tiny configs and write the JSON their issues specify.

The figures themselves come from ``--quick`` and full runs (docs); these runs only prove the scripts work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# bench_farm starts its own local Ray: private HOME and RAY_TMPDIR, loopback, no auth (conftest.ray_env).
# Benchmark scripts in subprocesses: slow.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_env")]

ROOT = Path(__file__).resolve().parents[1]


def _run_tiny(run_script, script: str, config: str, out: Path) -> dict:
    """Run ``jobs/<script>``'s ``main`` with a tiny config ``config`` (an expression in the script's names)."""
    code = (
        "import runpy, sys; from pathlib import Path; "
        f"job = runpy.run_path('jobs/{script}', run_name='bench'); "
        f"job['main'](eval({config!r}, job), Path(sys.argv[1]))"
    )
    run_script("-c", code, str(out))
    return json.loads((out / script.replace(".py", ".json")).read_text())


def test_bench_estimator_tiny(tmp_path, run_script):
    result = _run_tiny(
        run_script,
        "bench_estimator.py",
        "EstimatorStudy(queries=(4, 8), layers=(('late', 'blocks.3.mlp.fc2'),), estimators=('lr',), "
        "allocators=('equal', 'neyman'), cosine_reps=2, variance_reps=4, variance_queries=8, trace_pilot=8)",
        tmp_path,
    )
    rows = result["cosine"]
    assert {(r["allocator"], r["queries_per_sample"]) for r in rows} == {
        (a, q) for a in ("equal", "neyman") for q in (4, 8)
    }
    # Two repetitions at 4-8 queries per sample are noise: only the plumbing is checked here; the
    # benchmark's own bars (docs/RESULTS.md) judge the figures of a full run.
    assert all(np.isfinite(r["cosine"]) and np.isfinite(r["cosine_se"]) for r in rows)
    ratio = result["variance_ratio"]
    assert 0 < ratio["predicted"] <= 1.0 + 1e-9 and ratio["measured"] > 0  # neyman minimises J: predicted <= 1
    assert (tmp_path / "bench_estimator.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_farm_tiny(tmp_path, run_script):
    result = _run_tiny(
        run_script,
        "bench_farm.py",
        "BenchConfig(replicas=(1,), batch_size=8, queries_per_sample=8, makespan_queries=8, shard_cost=32, "
        "spread=10.0, reps=1, rounds=1, train_steps=1, limit_queries=4, limit_batches=(8,))",
        tmp_path,
    )
    assert set(result["efficiency"]) == set(result["blackbox_efficiency"]) == set(result["blackbox_vs_limit"]) == {"1"}
    figures = (*result["efficiency"].values(), *result["blackbox_efficiency"].values())
    assert all(v > 0 for v in (*figures, *result["blackbox_vs_limit"].values()))
    # One repetition: the paired medians are the best-of figures.
    details = result["details"]
    assert details["paired_efficiency"]["1"] == pytest.approx(result["efficiency"]["1"])
    assert details["paired_blackbox_vs_limit"]["1"] == pytest.approx(result["blackbox_vs_limit"]["1"])
    # Whole black-box steps against the limit: one repetition, so the median is its ratio.
    steps = details["blackbox_steps"]
    assert result["blackbox_step_vs_limit"] == steps["ratios"][0] > 0 and len(steps["ratios"]) == 1
    assert result["makespan_ratio"]["dynamic"] > 0 and result["makespan_ratio"]["static"] > 0
    assert 0 <= result["allocator_overhead"] < 1
    # Batch, task messages, losses and traces, no parameters: well under 1 MB. Shipping the step's LR noise
    # instead (B * q * 2 groups * 17 tokens * 64 floats) would not be.
    assert 0 < result["bytes_per_step_per_worker"] < 1e6


def test_bench_allocation_tiny(tmp_path, run_script):
    result = _run_tiny(
        run_script,
        "bench_allocation.py",
        "BenchConfig(settings=(Setting('digits_vit', 8, 4), Setting('digits_mixer', 8, 4, blocks=MIXER_BLOCKS)), "
        "steps=2, checkpoints=(0, 2), reps=3, allocators=('neyman/clean', 'neyman/memory', 'joint'), oracle_pilot=8)",
        tmp_path,
    )
    assert result["default_allocator"] == "neyman/clean"
    assert [c["step"] for c in result["checkpoints"]] == [0, 2]
    for setting in result["settings"]:
        for checkpoint in setting["checkpoints"]:
            assert set(checkpoint["mse_ratio"]) == {"oracle", "joint_oracle", "neyman/clean", "neyman/memory", "joint"}
            # Three repetitions are noise: plumbing only.
            assert all(np.isfinite(v) for v in checkpoint["mse_ratio"].values())
        first, last = setting["checkpoints"]
        # At step 0 the memory is empty: the memory row is equal allocation with the same (paired) noise, exactly
        # equal's error; joint already splits the budget between groups (clean proxies times noise widths), so
        # its counts, and its error, differ from per-group Neyman's on the same proxy.
        assert first["memory_weight"] == 0 and first["mse_ratio"]["neyman/memory"] == 1.0
        assert first["mse_ratio"]["joint"] != first["mse_ratio"]["neyman/clean"]
        # The training run feeds its memory: the memory row measures what it names (it allocated equally when
        # the run it copies fed nothing).
        assert last["memory_weight"] > 0
        # LR: every group has a noise width, so every group's level over width times proxy is measured once the
        # fresh (zero) head passes errors down.
        assert len(last["level_ratio"]) == len(last["level"]) and all(r > 0 for r in last["level_ratio"])


def test_bench_engine_tiny(tmp_path, run_script):
    result = _run_tiny(
        run_script,
        "bench_engine.py",
        "BenchConfig(replace(DIGITS, shard=8, reps=3), replace(VIT_B16, shard=2, reps=3), peak_rows=2, "
        "lm=replace(LM, lm='tiny', shard=8, reps=3))",
        tmp_path,
    )
    assert result["device"] in ("cpu", "cuda")
    assert {k: set(v) for k, v in result["efficiency"].items()} == {
        "digits_vit": {"lr", "spsa", "es"},
        "vit_b16": {"lr", "spsa"},
        "lm": {"lr", "spsa"},
    }
    # A few rows timed three times are noise: plumbing only, never a speed threshold.
    # (A loaded host can time a plain forward slower than the queries: no upper bound.)
    assert all(0 < e < np.inf for figures in result["efficiency"].values() for e in figures.values())
    assert set(result["lr_bound"]) == {"digits_vit", "vit_b16", "lm"}
    assert all(0 < b <= 1 for b in result["lr_bound"].values())
    # The digits group is blocks.3.mlp.fc2 (256 -> 64) on 17 tokens: weight and bias assembly per query.
    assert result["details"]["digits_vit"]["assembly_flops_per_query"] == 17 * (2 * 256 * 64 + 64)
    assert result["noise_numbers_per_s"] > 0
    assert result["peak_replica_bytes"]["vit_b16"] > 0 and result["peak_rows"] == {"vit_b16": 2, "lm": 64}
    # The LM's default groups through hf: (GPT-2's Conv1D as nn.Linear), its rows fanned out at its last block.
    lm = result["details"]["lm"]
    assert lm["shared_prefix"] == "lm.transformer.h.1" and set(lm["efficiency_rank1_noise"]) == {"spsa"}
    # mlp.c_proj (128 -> 32) on 8 tokens: weight and bias assembly per query.
    assert lm["assembly_flops_per_query"] == 8 * (2 * 128 * 32 + 32)
    assert result["peak_plain_bytes"]["lm"] > 0 and result["peak_vs_plain"]["lm"] > 0


def test_bench_scale_tiny(tmp_path, run_script):
    result = _run_tiny(
        run_script,
        "bench_scale.py",
        "ScaleConfig(widths=(8, 96), wire_steps=1, batch_size=8, queries_per_sample=4, shard_cost=16, "
        "validate_queries=4, validate_replicas=(1, 2), validate_steps=1, gpus=(8, 64), reps=1)",
        tmp_path,
    )
    for kind in ("es", "lr"):
        p, driver = result["driver_bytes_per_step"][kind]["P"], result["driver_bytes_per_step"][kind]["bytes"]
        assert p[1] > 20 * p[0]
        # Parameters never cross the driver: the same messages whatever P (a byte or two of pickled ints aside).
        assert abs(driver[1] - driver[0]) <= 0.01 * driver[0], driver
    lr = result["replica_bytes_per_step"]["lr"]["bytes"]
    assert lr[1] > lr[0], "an LR replica's share of the ring grows with P"
    assert set(result["simulated_efficiency"]) == {"lr_vit_b16", "es_vit_b16"}
    for curve in result["simulated_efficiency"].values():
        assert set(curve) == {"8", "64"} and all(0 < e <= 1 for e in curve.values())
    for check in result["validation"].values():
        assert check["replicas"] == [1, 2] and all(t > 0 for t in check["predicted_s"] + check["measured_s"])
