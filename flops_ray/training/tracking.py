"""A run's logger ids in ``OUT/tracking.json`` (so a resumed run continues the same logger runs), and the error
of a logger whose package is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flops_ray.files import write_text

TRACKING = "tracking.json"
"""The file in a run's output directory holding its logger runs' ids, so a resumed run continues them."""


def read_tracking(out: Path) -> dict[str, Any]:
    """The logger run ids a previous run in ``out`` recorded (empty when none)."""
    path = out / TRACKING
    return json.loads(path.read_text()) if path.is_file() else {}


def record_tracking(out: Path, name: str, ids: dict[str, Any]) -> None:
    """Record logger ``name``'s run ids in ``out/tracking.json`` (atomically), beside the other loggers'."""
    write_text(out / TRACKING, json.dumps({**read_tracking(out), name: ids}, indent=2) + "\n")


def missing_extra(name: str, exc: ImportError) -> ImportError:
    """The error of a logger whose package is not installed, naming the extra that installs it."""
    return ImportError(f"job.loggers: {name} needs pip install 'flops_ray[{name}]' ({exc})")
