"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# The black-box example starts a local Ray: private HOME and RAY_TMPDIR, loopback, no auth (conftest.ray_env).
pytestmark = pytest.mark.usefixtures("ray_env")

ROOT = Path(__file__).resolve().parents[1]


def _section_code(heading: str) -> str:
    """The first ```python block under the README heading ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_quick_start_has_exactly_two_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, re.DOTALL).group(1)
    assert block.strip().splitlines() == ["make train", "make test"]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def _run(heading: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _section_code(heading)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_python_api_example_runs_as_written():
    stdout = _run("Python API")
    # 100 forward-only steps from a fresh head: 0.3 is > 5 binomial sd above chance on 360 test images.
    assert float(re.search(r"test accuracy ([0-9.]+)", stdout).group(1)) > 0.3, stdout


@pytest.mark.slow
def test_black_box_example_runs_as_written():
    stdout = _run("Custom black-box losses")
    distance = float(re.search(r"distance to the truth: ([0-9.]+)", stdout).group(1))
    # ||w_true|| = 1.85: the search must recover it, not merely move.
    assert distance < 0.1, stdout
