"""Joining a cluster (``farm.address``): one deadline for the whole handshake, and one line naming what answered."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from flops_ray.farm.errors import FarmError
from flops_ray.farm.ray_init import wait_reachable

ROOT_HANG = 600
"""Seconds after which the job is taken to hang (a deadline that stops a hang, never a verdict)."""


@contextlib.contextmanager
def tarpit() -> Iterator[int]:
    """A loopback port whose connections the kernel accepts (the listen backlog) but nothing ever answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@contextlib.contextmanager
def banner_server(banner: bytes) -> Iterator[int]:
    """A loopback port that answers every connection with ``banner`` (another service than Ray)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(banner)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_a_port_that_accepts_but_never_answers_fails_within_the_timeout():
    with tarpit() as port, pytest.raises(FarmError) as err:
        wait_reachable(f"127.0.0.1:{port}", 1.0)
    assert str(err.value) == (
        f"farm.address: 127.0.0.1:{port} accepts connections but sent nothing within 1 s (farm.connect_timeout_s): "
        "a firewall, or a service that is not Ray's GCS (its port is 6379 by default)"
    )


def test_another_service_is_named_by_its_answer():
    with banner_server(b"SSH-2.0-OpenSSH_9.6\r\n") as port, pytest.raises(FarmError) as err:
        wait_reachable(f"ray://127.0.0.1:{port}", 5.0)
    assert str(err.value).startswith(f"farm.address: ray://127.0.0.1:{port} answered b'SSH-2.0-OpenSSH_9.6\\r\\n', ")
    with banner_server(b"") as port, pytest.raises(FarmError, match="closed the connection without an answer"):
        wait_reachable(f"127.0.0.1:{port}", 5.0)


@pytest.mark.usefixtures("ray_local")
def test_a_ray_cluster_passes():
    import ray

    wait_reachable(ray.get_runtime_context().gcs_address, 5.0)


def test_a_job_joining_a_tarpit_ends_with_one_line(tmp_path, ray_env):
    """The whole run: ``flops-ray train`` against a tarpit exits 2 with one line instead of waiting forever."""
    with tarpit() as port:
        args = ["train", "--quick", "--out", str(tmp_path), "--set", "farm.backend=ray"]
        args += ["--set", f"farm.address=127.0.0.1:{port}", "--set", "farm.connect_timeout_s=2"]
        proc = subprocess.run(
            [sys.executable, "-m", "flops_ray.app.cli", *args], capture_output=True, text=True, timeout=ROOT_HANG
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: farm.address: 127.0.0.1:{port} accepts connections but sent nothing")
    assert proc.stderr.count("\n") == 1, proc.stderr
