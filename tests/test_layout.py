"""House rules checked mechanically: the maths never imports ray; only the farm does."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flops_ray"
MATHS = {"budget", "allocators", "gaussian_allocator", "seeding", "shards", "engine", "step", "groups", "messages"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_farm_modules_import_ray():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "farm" not in p.relative_to(PACKAGE).parts and "ray" in _imports(p)
    ]
    assert not offenders, f"modules outside flops_ray/farm import ray: {offenders}"


def test_maths_touches_no_files():
    for name in MATHS:
        src = (PACKAGE / f"{name}.py").read_text()
        imported = _imports(PACKAGE / f"{name}.py")
        assert not imported & {"ray", "os", "pathlib", "pyarrow", "safetensors", "io"}, name
        assert "open(" not in src, f"{name} opens files"


def test_maths_modules_exist():
    assert all((PACKAGE / f"{m}.py").exists() for m in MATHS)
