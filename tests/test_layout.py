"""House rules checked mechanically: the folders are the layers, imports point down, no module imports in a circle.

A module's layer is its folder under ``flops_ray/`` (docs/ARCHITECTURE.md); a handful of ground modules
sit at the top. A module may import its own layer and the ones below it, never one above; the maths
layers touch no files, and only the farm imports ray.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flops_ray"
GROUND = {"messages", "seeding", "files", "registry"}
"""Top-level modules every layer may use: typed messages, seeds, atomic file writes, the registry shape."""
LAYERS = (
    "config",
    "data",
    "models",
    "allocation",
    "estimators",
    "replica",
    "step",
    "farm",
    "training",
    "app",
    "studies",
)
"""Folders, lowest first."""
MATHS = {"config", "models", "allocation", "estimators", "replica", "step"}
"""Layers of pure torch: no files, no ray."""
FILE_MODULES = {"ray", "os", "pathlib", "pyarrow", "safetensors", "io", "shutil", "tempfile"}
MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(name: str) -> str:
    """The layer of a dotted module name: its folder, ``ground`` for a ground module, ``facade`` for the package."""
    parts = name.split(".")
    if len(parts) == 1:
        return "facade"
    if parts[1] in LAYERS:
        return parts[1]
    if len(parts) == 2 and parts[1] in GROUND:
        return "ground"
    raise AssertionError(f"{name} sits outside every layer folder (tests/test_layout.py LAYERS / GROUND)")


def _rank(layer: str) -> int:
    return -1 if layer == "ground" else len(LAYERS) if layer == "facade" else LAYERS.index(layer)


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


NAMES = {_name(p): p for p in MODULES}


def _graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (an import of its own parent package is not an edge)."""
    return {
        name: {d for d in _imports(path) if d in NAMES and d != name and not name.startswith(d + ".")}
        for name, path in NAMES.items()
    }


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_sits_in_a_layer(path):
    _layer(_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = _rank(_layer(_name(path)))
    upward = sorted(d for d in _graph()[_name(path)] if _rank(_layer(d)) > own)
    assert not upward, f"{_name(path)} ({_layer(_name(path))}) imports a higher layer: {upward}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert not _cycles(_graph()), f"import cycles (function-level imports included): {_cycles(_graph())}"


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_farm_modules_import_ray():
    offenders = [
        name
        for name, p in NAMES.items()
        if _layer(name) != "farm" and any(n.split(".")[0] == "ray" for n in _imports(p))
    ]
    assert not offenders, f"modules outside flops_ray/farm import ray: {offenders}"


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if _layer(_name(p)) in MATHS or _name(p) in {"flops_ray.messages", "flops_ray.seeding"}],
    ids=lambda p: _name(p),
)
def test_maths_touches_no_files(path):
    roots = {n.split(".")[0] for n in _imports(path)}
    assert not roots & FILE_MODULES, f"{path.name} imports {sorted(roots & FILE_MODULES)}"
    assert "open(" not in path.read_text(), f"{path.name} opens files"
