"""The ``flops-ray`` command: help for every option, the job's default config, image folder conversion, and a
tiny train -> eval -> plot round trip."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from flops_ray.app.cli import build_parsers, main
from flops_ray.app.job_config import quick_config, train_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command", [[], ["train"], ["eval"], ["plot"], ["convert"], ["bench"]], ids=lambda c: c[0] if c else "top"
)
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parsers()[command[0] if command else ""]
    # argparse has no public list of a parser's options; _actions is the one place they are.
    for action in parser._actions:
        # An option without help text shows only its name; each must say what it does.
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text


def _cli() -> list[str]:
    script = shutil.which("flops-ray", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "flops_ray.app.cli"]


def test_train_has_the_default_config_of_the_job(monkeypatch):
    """``flops-ray train`` and ``jobs/finetune_vit.py`` are one run: same config file, same ``--quick`` run, on Ray."""
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import finetune_vit

    for argv in ([], ["--quick", "--set", "steps=3"]):
        cli_args = build_parsers()["train"].parse_args(argv)
        job_args = finetune_vit.build_parser().parse_args(argv)
        assert cli_args.config == job_args.config == str(ROOT / "jobs" / "configs" / "digits_ops_lr.yaml")
        assert cli_args.quick == job_args.quick == ("--quick" in argv)
        cli_run, job_run = train_run(cli_args), train_run(job_args)
        assert cli_run == job_run and job_run[2] == Path("runs/digits_ops_lr")
        cfg, _ = quick_config(*cli_run[:2])
        assert cfg == quick_config(*job_run[:2])[0] and cfg.farm.backend == "ray"


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (color, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_convert_writes_a_parquet_dataset(tmp_path, capsys):
    for name, color in (("cat", 255), ("dog", 0)):
        (tmp_path / "root" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "root" / name / f"{i}.png").write_bytes(_png(color))
    (tmp_path / "outside.png").write_bytes(_png(9))
    (tmp_path / "root" / "dog" / "link.png").symlink_to(tmp_path / "outside.png")
    out = tmp_path / "data" / "animals.parquet"
    assert main(["convert", str(tmp_path / "root"), str(out), "--rows-per-group", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}: 4 images in 2 classes: cat 2, dog 2\n"
    # The skipped link is named on one line, like an error.
    assert captured.err.startswith("warning: ") and captured.err.count("\n") == 1
    assert str(tmp_path / "root" / "dog" / "link.png") in captured.err
    assert pq.read_table(out)["label"].to_pylist() == [0, 0, 1, 1]
    assert pq.ParquetFile(out).metadata.num_row_groups == 2


def test_convert_error_names_the_file(tmp_path, capsys):
    (tmp_path / "root" / "cat").mkdir(parents=True)
    (tmp_path / "root" / "cat" / "notes.png").write_text("not an image")
    assert main(["convert", str(tmp_path / "root"), str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'root' / 'cat' / 'notes.png'}: not an image")
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")  # the default config runs on a local Ray the command starts
def test_train_eval_plot(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.run(
        [*_cli(), "train", "--quick", "--out", str(out), "--set", "steps=2", "--set", "allocator.kind=neyman"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["allocator"]["kind"] == "neyman"
    assert summary["config"]["farm"]["backend"] == "ray"

    assert main(["eval", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2 and result["test_accuracy"] == pytest.approx(summary["final_test_accuracy"])

    assert main(["plot", str(out / "metrics.parquet"), "--out", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "allocation.png",
        "curves.png",
        "trace_vs_loss.png",
    ]


def test_bench_lists_and_rejects_unknown(capsys):
    assert main(["bench", "--list"]) == 0
    assert "estimator" in capsys.readouterr().out.split()
    assert main(["bench", "nonexistent"]) == 2
    assert "no benchmark 'nonexistent'" in capsys.readouterr().err


def test_bench_runs_the_script_with_its_arguments(tmp_path, capsys):
    (tmp_path / "bench_echo.py").write_text(
        "import sys; sys.exit(0 if sys.argv[1:] == ['--quick', '--out', 'x'] else 3)\n"
    )
    assert main(["bench", "--jobs-dir", str(tmp_path), "echo", "--quick", "--out", "x"]) == 0
    assert main(["bench", "--jobs-dir", str(tmp_path), "echo", "--", "--quick"]) == 3


def test_help_imports_nothing_heavy():
    """``--help`` must be instant: the command line loads torch, timm and ray only when a command runs."""
    code = "import sys, flops_ray.app.cli; sys.exit(sorted({'torch', 'timm', 'ray'} & set(sys.modules)) != [])"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_an_error_is_one_line_and_exit_2(capsys):
    assert main(["train", "--set", "steps=ten"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: steps: must be an integer, got 'ten'")
    with pytest.raises(Exception, match="steps: must be an integer"):
        main(["--debug", "train", "--set", "steps=ten"])
