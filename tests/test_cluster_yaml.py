"""Cluster YAMLs for ``ray up``: Ray's own JSON schema and semantic checks, offline.

``prepare_config`` and ``validate_config`` are private Ray API (pinned: ray[default]==2.60.0 in
pyproject.toml); they merge the provider defaults and check that the head node type exists and the
``min_workers`` fit ``max_workers``. The checks below add what flops_ray needs of a cluster.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ray_util = pytest.importorskip("ray.autoscaler._private.util")

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
FILES = sorted(CLUSTER.glob("*.yaml"))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_provider_has_a_file():
    assert {p.stem for p in FILES} >= {"aws", "gcp", "onprem"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_ray_schema_as_written(path):
    """The file itself (before Ray fills in defaults) satisfies ray-schema.json."""
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_load(path), schema)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_ray_prepare_and_validate(path):
    """What ``ray up`` does first: merge provider defaults, then schema plus semantic validation."""
    prepared = ray_util.prepare_config(copy.deepcopy(_load(path)))
    ray_util.validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    for name, node in types.items():
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    assert sum(n["min_workers"] for n in types.values()) <= prepared["max_workers"]


def _start_flags(commands: list[str]) -> str:
    return " ".join(" ".join(commands).split())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_head_has_no_gpus_and_workers_do(path):
    cfg = _load(path)
    head_start = _start_flags(cfg["head_start_ray_commands"])
    assert "--num-gpus=0" in head_start and "--num-cpus=0" in head_start
    if cfg["provider"]["type"] == "local":
        # One node type on-prem: the workers are the listed GPU machines.
        assert cfg["provider"]["worker_ips"] and cfg["max_workers"] >= 1
        return
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    assert all(t["max_workers"] >= 1 and t["max_workers"] >= t.get("min_workers", 0) for t in gpu_types.values())
    assert sum(t["max_workers"] for t in gpu_types.values()) <= cfg["max_workers"]


@pytest.mark.parametrize("path", [p for p in FILES if p.stem != "onprem"], ids=lambda p: p.stem)
def test_cloud_files_offer_spot_or_preemptible_workers(path):
    node_configs = [t["node_config"] for t in _load(path)["available_node_types"].values()]
    spot = [c for c in node_configs if c.get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    preemptible = [
        c for c in node_configs if isinstance(c.get("scheduling"), dict) and c["scheduling"].get("preemptible")
    ]
    assert spot or preemptible


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_project_install_and_token_auth_reach_every_node(path):
    cfg = _load(path)
    # file_mounts go to the head and to every worker.
    assert cfg["file_mounts"]["~/flops_ray"] == "."
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    setup = " ".join(cfg["setup_commands"])  # setup_commands run on every node
    assert "pip install -e ~/flops_ray" in setup
    assert "RAY_AUTH_MODE=token" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in _start_flags(cfg[key]), key


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_header_shows_how_to_use_it(path):
    header = path.read_text().split("\n\n")[0]
    assert f"ray up cluster/{path.name}" in header
    assert "ray job submit" in header and "ray get-auth-token --generate" in header
