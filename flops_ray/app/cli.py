"""The ``flops-ray`` command: ``train``, ``eval``, ``plot``, ``convert``, ``bench`` and ``tune``, mirroring the Python API.

    flops-ray train --config jobs/configs/digits_ops_lr.yaml --out runs/lr --set steps=100
    flops-ray eval runs/lr/checkpoint.safetensors
    flops-ray plot runs/lr
    flops-ray convert cifar100/train data/cifar100_train.parquet
    flops-ray convert --captions blip_laion_cc_sbu_558k.json --test-rows 1000 images/ data/lcs558k_train.parquet
    flops-ray bench estimator -- --quick --out runs/bench
    flops-ray tune --config jobs/configs/digits_ops_lr.yaml --search lr=loguniform:1e-4:1e-1 --trials 8

``train`` is :func:`flops_ray.app.run.train` (the logic and the default config of ``jobs/finetune_vit.py``);
``eval`` is :func:`flops_ray.app.run.evaluate`; ``plot`` is :func:`flops_ray.app.plot.plot_metrics`; ``convert``
is :func:`flops_ray.data.convert.image_folder_to_parquet` (with ``--captions``,
:func:`~flops_ray.data.captions.captions_to_parquet`); ``bench`` runs ``jobs/bench_<name>.py`` in a
subprocess with this Python; ``tune`` is :func:`flops_ray.app.tune.tune`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

from flops_ray.app.errors import add_debug_option, reported
from flops_ray.app.job_config import DEFAULT_CONFIG, add_train_arguments, jobs_dir, train_run


def _benches(jobs: Path) -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in jobs.glob("bench_*.py"))


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train from a config YAML (the logic and default config of jobs/finetune_vit.py)",
        description="Train and write OUT/summary.json, metrics.parquet, checkpoint.safetensors and plots. "
        f"Without --config this is the run of jobs/finetune_vit.py: {DEFAULT_CONFIG.name}, on a Ray farm.",
    )
    add_train_arguments(p)
    return p


def _eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="test accuracy of a checkpoint",
        description="Rebuild a checkpoint's model from its stored config and print its test accuracy as JSON.",
    )
    p.add_argument("checkpoint", help="a checkpoint.safetensors written by train (or a run directory holding one)")
    p.add_argument(
        "--test-dataset", default=None, help="Parquet test split (default: the config's dataset's test split)"
    )
    p.add_argument("--image-column", default=None, help="Parquet column of encoded images (default: the config's)")
    p.add_argument("--label-column", default=None, help="Parquet column of integer labels (default: the config's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test samples (default: all)")
    return p


def _plot_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plot",
        help="PNG plots of a run's metrics",
        description="Write curves.png, allocation.png and trace_vs_loss.png from a metrics.parquet.",
    )
    p.add_argument("metrics", help="a metrics.parquet, or a run directory holding one")
    p.add_argument("--out", default=None, help="directory for the PNGs (default: beside the metrics file)")
    return p


def _convert_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert an image folder (one subfolder per class) to a Parquet dataset",
        description="Write ROOT/<class>/<image> as a Parquet file with columns image (PNG/JPEG bytes) and label "
        "(the index of the class folder in sorted order; the names are stored in the file's metadata). Every image "
        "is decoded on the way: an unreadable file, or one with NaN/inf pixels, stops the conversion naming it, and "
        "OUT is written only complete. Images in sub-folders of a class folder belong to that class. Skipped with a "
        "warning naming them: hidden entries (.git, .ipynb_checkpoints), symlinks leading out of ROOT, folder links "
        "that loop, images directly in ROOT. Prints the classes and their image counts.",
    )
    p.add_argument(
        "root", metavar="ROOT", help="folder of class folders, e.g. cifar100/train holding apple/, bicycle/, ..."
    )
    p.add_argument("out", metavar="OUT", help="the Parquet file to write, e.g. data/cifar100_train.parquet")
    p.add_argument("--rows-per-group", type=int, default=1024, help="images per Parquet row group (default: 1024)")
    p.add_argument(
        "--captions",
        metavar="FILE",
        help="write captioned images instead: FILE lists image paths (relative to ROOT) and captions, as JSON lines "
        '{"image": ..., "caption": ...} or LLaVA\'s JSON list (LCS558K); OUT gets the columns image and caption',
    )
    p.add_argument(
        "--test-rows",
        type=int,
        default=0,
        help="with --captions: the last N captions go to the test file (OUT with 'train' replaced by 'test')",
    )
    return p


def _tune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tune",
        help="search config values with Ray Tune, one run (with its own farm) per trial",
        description="Run TRIALS trials of the config, each with its values of the searched keys, report every "
        "evaluation to Tune (ASHA stops the trials behind) and write OUT/trials.json and OUT/best.yaml, which "
        "flops-ray train --config OUT/best.yaml runs as is. Trials run in OUT/trials/<trial id>; Tune's own files "
        "are in OUT/tune.",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"config YAML (default: {DEFAULT_CONFIG})")
    p.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="a searched key, repeatable: lr=loguniform:1e-4:1e-1, groups.0.sigma=choice:1e-3,1e-2, "
        "batch_size=randint:16:64, allocator.kind=grid:equal,gaussian (uniform too)",
    )
    p.add_argument("--trials", type=int, default=8, help="samples of the search space (default: 8)")
    p.add_argument("--out", default="runs/tune", help="output directory (default: runs/tune)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every trial")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "loss"], help="what ranks trials")
    p.add_argument("--mode", default="max", choices=["max", "min"], help="max for accuracy, min for loss")
    p.add_argument("--scheduler", default="asha", choices=["asha", "fifo"], help="asha stops trials behind")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny trials (train --quick); without --search, 4 trials over lr and groups.0.sigma",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in OUT")
    return p


def _bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="run a benchmark script jobs/bench_<name>.py",
        description="Run jobs/bench_<name>.py with this Python; arguments after the name (or after --) go to it.",
    )
    p.add_argument("name", nargs="?", help="benchmark name, e.g. estimator for jobs/bench_estimator.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--jobs-dir", default=None, help="directory of the bench_*.py scripts (default: jobs/)")
    return p


_COMMANDS = {
    "train": _train_parser,
    "eval": _eval_parser,
    "plot": _plot_parser,
    "convert": _convert_parser,
    "bench": _bench_parser,
    "tune": _tune_parser,
}
"""Each command's parser builder, in the order of ``flops-ray --help``."""


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    """The ``flops-ray`` parser (key ``""``) and each command's own (``train``, ``eval``, ``plot``, ...)."""
    parser = argparse.ArgumentParser(
        prog="flops-ray",
        description="Forward-only training with optimal query allocation (FLOPS, ICLR 2025) on a Ray query farm.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    add_debug_option(parser)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{" + ",".join(_COMMANDS) + "}",
        help="what to do (each has its own --help)",
    )
    return {"": parser, **{name: add(sub) for name, add in _COMMANDS.items()}}


def _in_dir(path: str, name: str) -> Path:
    """``path/name`` when ``path`` is a run directory holding ``name``, else ``path``."""
    p = Path(path)
    return p / name if (p / name).exists() else p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flops-ray`` console script; returns the exit status.

    An error prints one line, ``error: ...``, and returns 2; ``--debug`` shows the traceback instead; Ctrl-C
    returns 130 quietly (:func:`flops_ray.app.errors.reported`).
    """
    args = build_parsers()[""].parse_args(argv)
    return reported(lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert" and args.captions:
        from flops_ray.data.captions import captions_to_parquet

        for path in captions_to_parquet(args.captions, args.root, args.out, args.rows_per_group, args.test_rows):
            print(f"{path}: {_parquet_rows(path)} captioned images")
        return 0
    if args.command == "convert":
        _convert(args.root, args.out, args.rows_per_group)
        return 0
    # The heavy imports (torch, timm, ray) wait until a command needs them: --help stays fast.
    from flops_ray.app import run

    if args.command == "train":
        cfg, job, out = train_run(args)
        run.train(cfg, out, job, quick=args.quick, resume=args.resume)
    elif args.command == "eval":
        given = {
            "test_dataset": args.test_dataset,
            "image_column": args.image_column,
            "label_column": args.label_column,
            "limit": args.limit,
        }
        data = {k: v for k, v in given.items() if v is not None}
        print(json.dumps(run.evaluate(_in_dir(args.checkpoint, run.CHECKPOINT), **data), indent=2))
    elif args.command == "tune":
        from flops_ray.app.tune import tune

        tune(
            args.config,
            args.search,
            args.trials,
            args.out,
            sets=args.set,
            metric=args.metric,
            mode=args.mode,
            scheduler=args.scheduler,
            quick=args.quick,
            resume=args.resume,
        )
    elif args.command == "plot":
        from flops_ray.app.plot import plot_metrics

        metrics = _in_dir(args.metrics, run.METRICS)
        for path in plot_metrics(metrics, args.out or metrics.parent):
            print(path)
    else:
        jobs = Path(args.jobs_dir) if args.jobs_dir else jobs_dir()
        known = _benches(jobs)
        if args.list or not args.name:
            print("\n".join(known) if known else f"no bench_*.py in {jobs}")
            return 0
        script = jobs / f"bench_{args.name}.py"
        if not script.is_file():
            print(f"flops-ray bench: no benchmark {args.name!r} ({script}); known: {known}", file=sys.stderr)
            return 2
        rest = args.args[1:] if args.args[:1] == ["--"] else args.args
        return subprocess.call([sys.executable, str(script), *rest])
    return 0


def _parquet_rows(path: str | Path) -> int:
    """Rows of a Parquet file (from its footer)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _convert(root: str, out: str, rows_per_group: int) -> None:
    import pyarrow.parquet as pq

    from flops_ray.data.convert import image_folder_to_parquet

    with warnings.catch_warnings():
        # A skipped symlink is one line on stderr, like an error, not a source location and a code line.
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        classes = image_folder_to_parquet(root, out, rows_per_group)
    counts = Counter(pq.read_table(out, columns=["label"])["label"].to_pylist())
    shown = ", ".join(f"{name} {counts[i]}" for i, name in enumerate(classes[:10]))
    more = f", and {len(classes) - 10} more" if len(classes) > 10 else ""
    print(f"{out}: {sum(counts.values())} images in {len(classes)} classes: {shown}{more}")


if __name__ == "__main__":
    sys.exit(main())
