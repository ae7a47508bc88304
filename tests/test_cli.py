"""The ``flops-ray`` command: help for every option, and a tiny train -> eval -> plot round trip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flops_ray.cli import build_parsers, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["plot"], ["bench"]], ids=lambda c: c[0] if c else "top")
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
    return [script] if script else [sys.executable, "-m", "flops_ray.cli"]


@pytest.mark.slow
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
    summary = json.loads((out / "finetune_vit.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["allocator"]["kind"] == "neyman"

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
    code = "import sys, flops_ray.cli; sys.exit(sorted({'torch', 'timm', 'ray'} & set(sys.modules)) != [])"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_an_error_is_one_line_and_exit_2(capsys):
    assert main(["train", "--set", "steps=ten"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: steps: must be an integer, got 'ten'")
    with pytest.raises(Exception, match="steps: must be an integer"):
        main(["--debug", "train", "--set", "steps=ten"])
