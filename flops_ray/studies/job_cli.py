"""The command line the study jobs share: ``--quick`` for the small version, ``--out`` for the folder it writes,
``--debug`` for the traceback of an error (otherwise one line, ``error: ...``, and exit 2: :func:`run_main`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flops_ray.app.errors import add_debug_option, run_main

__all__ = ["job_parser", "run_main"]


def job_parser(doc: str, name: str, quick: str) -> argparse.ArgumentParser:
    """A parser that shows the job's docstring ``doc`` as its help, with ``--quick`` (described by ``quick``) and
    ``--out`` (default ``runs/<name>``); a job adds its own options to it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--out", type=Path, default=Path("runs") / name, help=f"output directory (default: runs/{name})"
    )
    return add_debug_option(parser)
