"""``ray job submit`` end to end: a real local head with token auth, the job submitted by the CLI and by
``JobSubmissionClient``, its outputs checked, then only this test's Ray processes stopped.

The head runs on loopback with every port chosen free, in a temporary HOME and RAY_TMPDIR, so it
neither sees nor disturbs another Ray on the machine (loopback, token auth, never ``ray stop``).
Its processes are found by a marker in their environment and by the process group of ``ray start``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# A real Ray head and `ray job submit`: slow.
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MARKER = "FLOPS_RAY_TEST_HEAD"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _our_pids(marker: str) -> list[int]:
    """PIDs whose environment carries this test's marker (every process the head started inherits it)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


def _stop(pgid: int, marker: str) -> None:
    """Stop the head: SIGTERM to its process group and marked processes, SIGKILL to what is left."""
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for pid in _our_pids(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _our_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _our_pids(marker):
            return


@pytest.fixture(scope="module")
def head():
    if not sys.platform.startswith("linux"):
        pytest.skip("process discovery reads /proc")
    # Short path: Ray's unix sockets live under RAY_TMPDIR and socket paths are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rjs"))
    marker = uuid.uuid4().hex
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    env = {
        **os.environ,
        "HOME": str(root),
        "RAY_TMPDIR": str(root),
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        MARKER: marker,
    }
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    token = (root / ".ray" / "auth_token").read_text().strip()
    start = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            # Logical CPUs: a tuning trial places its driver and 2 replicas (3 bundles) at once.
            "--num-cpus=3",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Its own process group: the daemons it launches stay in it, so the test can stop exactly them.
        start_new_session=True,
    )
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output
        yield {"env": env, "address": f"http://127.0.0.1:{dash}", "token": token, "root": root, "ray": ray_cli}
    finally:
        _stop(start.pid, marker)
        shutil.rmtree(root, ignore_errors=True)
    assert not _our_pids(marker), "Ray processes of this test survived"


def _entrypoint(out: Path) -> str:
    return f"python jobs/finetune_vit.py --quick --out {out} --set steps=2"


def test_submit_with_the_cli(head, check_outputs):
    out = head["root"] / "out_cli"
    submission = f"cli-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [
            head["ray"],
            "job",
            "submit",
            "--address",
            head["address"],
            "--submission-id",
            submission,
            "--working-dir",
            str(ROOT),
            "--",
            *_entrypoint(out).split(),
        ],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert f"Job '{submission}' succeeded" in text, text
    assert "step     1 (2/2 done)" in text  # the job's progress lines are streamed back
    status = subprocess.run(
        [head["ray"], "job", "status", "--address", head["address"], submission],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    check_outputs(out, 2)


def test_submit_with_the_python_client(head, check_outputs):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # The token goes in the header explicitly: Ray caches the token loader per process, and other
    # tests in this process may have used Ray without auth.
    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    out = head["root"] / "out_client"
    job_id = client.submit_job(entrypoint=_entrypoint(out), runtime_env={"working_dir": str(ROOT)})
    deadline = time.monotonic() + 240
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "done: 2 steps" in logs
    check_outputs(out, 2)


def test_requests_without_the_token_are_refused(head):
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match=r"(?i)unauthori|401|token"):
        JobSubmissionClient(head["address"], headers={"Authorization": "Bearer wrong-token"}).list_jobs()


def test_a_tuning_run_submits_as_a_job(head):
    """``flops-ray tune`` as a job's entrypoint joins the cluster it was submitted to (``RAY_ADDRESS``): its
    trials' farms start there, and the search writes its trials and best config."""
    import json

    out = head["root"] / "out_tune"
    flops_ray = str(Path(sys.executable).parent / "flops-ray")
    submit = [head["ray"], "job", "submit", "--address", head["address"], "--working-dir", str(ROOT), "--"]
    proc = subprocess.run(
        [*submit, flops_ray, "tune", "--quick", "--out", str(out)],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in text, text[-4000:]
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == 4
    assert (out / "best.yaml").is_file()
