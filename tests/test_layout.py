"""House rules checked mechanically: layers point one way, the core touches no files, only the farm imports ray.

The layers (docs/ARCHITECTURE.md): core <- farm <- training <- app. A module may import its own layer and
the layers below it, never one above; every module of the package belongs to exactly one layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flops_ray"
CORE = {
    "allocator_fit",
    "allocators",
    "blackbox",
    "budget",
    "config",
    "config_dict",
    "data",
    "data_config",
    "engine",
    "estimators",
    "farm_config",
    "gaussian_allocator",
    "groups",
    "heap",
    "local_backend",
    "losses",
    "messages",
    "models",
    "noise",
    "plan",
    "prompts",
    "replay",
    "seeding",
    "step_time",
    "shards",
    "step",
    "trace_memory",
    "trace_proxy",
    "update",
    "validation",
}
LAYERS = {
    "core": CORE,
    "farm": {"farm"},
    "training": {"checkpoint", "driver", "metrics_log", "parquet_data", "train_state", "trainer", "weights"},
    "app": {"__init__", "cli", "estimator_study", "job_config", "plot", "run", "run_hooks", "run_lock"},
}
RANK = {name: rank for rank, name in enumerate(LAYERS)}
FILE_MODULES = {"ray", "os", "pathlib", "pyarrow", "safetensors", "io", "shutil", "tempfile"}


def _unit(path: Path) -> str:
    """The layer unit of a module: its top-level name under the package (a subpackage counts as one)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _layer(unit: str) -> str:
    return next(layer for layer, units in LAYERS.items() if unit in units)


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of the file (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    units = {_unit(p) for p in MODULES}
    known = set().union(*LAYERS.values())
    assert units <= known, f"modules without a layer in tests/test_layout.py: {sorted(units - known)}"
    assert not known - units, f"layers name modules that do not exist: {sorted(known - units)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = RANK[_layer(_unit(path))]
    upward = sorted(
        name
        for name in _imports(path)
        if name.startswith("flops_ray.")
        and name.split(".")[1] in set().union(*LAYERS.values())
        and RANK[_layer(name.split(".")[1])] > own
    )
    assert not upward, f"{path.name} ({_layer(_unit(path))}) imports a higher layer: {upward}"


def test_only_farm_modules_import_ray():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in MODULES
        if _unit(p) != "farm" and any(n == "ray" or n.startswith("ray.") for n in _imports(p))
    ]
    assert not offenders, f"modules outside flops_ray/farm import ray: {offenders}"


@pytest.mark.parametrize("path", [p for p in MODULES if _unit(p) in CORE], ids=lambda p: p.name)
def test_core_touches_no_files(path):
    roots = {n.split(".")[0] for n in _imports(path)}
    assert not roots & FILE_MODULES, f"{path.name} imports {sorted(roots & FILE_MODULES)}"
    assert "open(" not in path.read_text(), f"{path.name} opens files"
