"""The command line the study jobs share: ``--quick`` for the small version, ``--out`` for the folder it writes."""

from __future__ import annotations

import argparse
from pathlib import Path


def job_parser(doc: str, name: str, quick: str) -> argparse.ArgumentParser:
    """A parser that shows the job's docstring ``doc`` as its help, with ``--quick`` (described by ``quick``) and
    ``--out`` (default ``runs/<name>``); a job adds its own options to it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--out", type=Path, default=Path("runs") / name, help=f"output directory (default: runs/{name})"
    )
    return parser
