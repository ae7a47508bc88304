"""The output-directory lock: one owner, even when several runs start at once over a stale lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from flops_ray.app.lock import LOCK, RunLockedError, owned

ROUNDS = 100
"""Rounds of the race: the delete-and-create takeover this replaced gave two owners within 30 rounds."""
RUNNERS = 6
"""Runs starting at once in each round."""


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def _runner(out: str, start, done, results) -> None:
    """Start at the barrier; an owner holds the lock until every runner has tried, so at most one may get it."""
    start.wait()
    try:
        with owned(out):
            results.put("owner")
            done.wait()
    except RunLockedError:
        results.put("refused")
        done.wait()
    except Exception as exc:  # reported, so the test fails rather than waits for it
        results.put(f"error {exc!r}")
        done.wait()


def test_runs_starting_at_once_over_a_stale_lock_have_one_owner(tmp_path):
    ctx = multiprocessing.get_context("fork")
    dead = _dead_pid()
    for round_ in range(ROUNDS):
        out = tmp_path / str(round_)
        out.mkdir()
        (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
        start, done, results = ctx.Barrier(RUNNERS), ctx.Barrier(RUNNERS), ctx.Queue()
        procs = [ctx.Process(target=_runner, args=(str(out), start, done, results)) for _ in range(RUNNERS)]
        for p in procs:
            p.start()
        outcomes = sorted(results.get() for _ in procs)
        for p in procs:
            p.join()
        assert outcomes == ["owner"] + ["refused"] * (RUNNERS - 1), f"round {round_}: {outcomes}"
        assert not (out / LOCK).exists(), "the owner removes its lock when it ends"


def test_a_live_owner_is_named_and_a_killed_one_is_taken_over(tmp_path):
    """The refusal names the owner's host and pid; an owner killed without cleaning up leaves a lock that is taken over."""
    code = (
        "import sys, time; from flops_ray.app.lock import owned\n"
        "with owned(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(RunLockedError, match=rf"process {proc.pid} on {socket.gethostname()} "), owned(tmp_path):
            pass
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / LOCK).exists(), "a killed run leaves its lock file behind"
    with owned(tmp_path) as path:
        assert json.loads(path.read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}


def test_another_hosts_lock_is_trusted(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere.example", "pid": 1}))
    with pytest.raises(RunLockedError, match=r"process 1 on elsewhere\.example"), owned(tmp_path):
        pass
