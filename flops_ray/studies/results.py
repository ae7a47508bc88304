"""A study's result file: its figures as indented JSON, named for the study, in the study's output folder."""

from __future__ import annotations

import json
from pathlib import Path

from flops_ray.files import write_text


def write_result(out: Path, name: str, result: dict) -> Path:
    """Write ``result`` to ``out/<name>.json`` (the folder exists); returns the path."""
    path = out / f"{name}.json"
    write_text(path, json.dumps(result, indent=2) + "\n")
    return path
