"""Start or join Ray for the farm, keeping a local instance on loopback (docs/DESIGN.md section 5).

``flops_ray.farm`` sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before ray is imported; a program that
imports ray itself first must set it in its environment.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Iterator

import ray

from flops_ray.config import FarmConfig
from flops_ray.farm.errors import FarmError


def cluster_address(farm: FarmConfig) -> str:
    """The cluster the farm joins: ``farm.address``, else ``RAY_ADDRESS``; empty means this machine's Ray."""
    return farm.address or os.environ.get("RAY_ADDRESS", "")


HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
"""An HTTP/2 client's connection preface and an empty SETTINGS frame: Ray's GCS (gRPC) answers it with a
SETTINGS frame of its own, whatever its auth mode."""


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port``, ``[v6]:port`` or ``ray://host:port``; None for ``auto`` and the like."""
    host, sep, port = address.split("://")[-1].rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _tls() -> bool:
    """Whether Ray's ports speak TLS here (they answer only a TLS hello, so only the TCP connect is checked)."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def wait_reachable(address: str, timeout_s: float) -> None:
    """Return once the ``host:port`` in ``address`` answers as Ray does; ``auto`` and the like pass.

    One deadline covers the TCP connect and the first answer: ``ray.init`` itself retries an address where
    nothing answers forever, and waits as long on a port that accepts connections but never answers (a
    firewall's tarpit, another service). A GCS (or Ray Client server) speaks gRPC, so the check sends an
    HTTP/2 hello and wants an HTTP/2 SETTINGS frame back.

    Raises:
        FarmError: one line naming the address and what answered (nothing, a closed connection, other bytes).
    """
    host_port = _host_port(address)
    if host_port is None:
        return
    deadline = time.monotonic() + timeout_s
    within = f"within {timeout_s:g} s (farm.connect_timeout_s)"
    while True:
        left = deadline - time.monotonic()
        try:
            sock = socket.create_connection(host_port, timeout=max(0.1, min(5.0, left)))
        except OSError as exc:  # refused, unreachable, dropped: a cluster may still be starting
            if left <= 0:
                raise FarmError(f"farm.address: nothing answers at {address} {within}: {exc}") from exc
            time.sleep(min(1.0, max(0.0, left)))
            continue
        with sock:
            if _tls():
                return
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.sendall(HTTP2_HELLO)
                answer = sock.recv(64)
            except TimeoutError as exc:
                raise FarmError(
                    f"farm.address: {address} accepts connections but sent nothing {within}: a firewall, or a "
                    "service that is not Ray's GCS (its port is 6379 by default)"
                ) from exc
            except OSError as exc:  # reset: it closed the connection with our hello unread
                answer, what = b"", f"closed the connection without an answer ({exc.strerror or exc})"
            else:
                what = f"answered {answer[:40]!r}" if answer else "closed the connection without an answer"
        if len(answer) >= 9 and answer[3] == 0x04:  # an HTTP/2 frame header whose type is SETTINGS
            return
        raise FarmError(
            f"farm.address: {address} {what}, which is not Ray (its GCS speaks gRPC; its port is 6379 by default)"
        )


def init_ray(farm: FarmConfig, num_cpus: float | None = None, num_gpus: float | None = None) -> bool:
    """Connect to ``farm.address`` or start a local Ray on 127.0.0.1; a no-op if Ray is already up.

    With ``farm.address`` empty, a ``RAY_ADDRESS`` in the environment (set by ``ray job submit`` for its
    entrypoint) is joined, so a job runs on the cluster it was submitted to.

    Args:
        farm: the farm settings (``address`` empty: ``RAY_ADDRESS``, else a local instance).
        num_cpus: logical CPUs of a local instance (default: what the replicas reserve, at least the
            machine's cores, so the replicas fit).
        num_gpus: GPUs of a local instance (None lets Ray detect them; a fake count tests GPU placement).

    Returns:
        True when this call started or joined Ray, so the caller owns the ``ray.shutdown()``.
    """
    # The farm reads every result it needs and reports a failure itself, in one line; the calls it drops after a
    # failure would otherwise print their remote stacks as Ray's "Unhandled error" when collected.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if ray.is_initialized():
        return False
    address = cluster_address(farm)
    if address:
        wait_reachable(address, farm.connect_timeout_s)
        ray.init(address=address)
        return True
    if num_cpus is None:
        num_cpus = max(os.cpu_count() or 1, farm.max_replicas * farm.num_cpus_per_replica)
    # A single local node must offer the per-replica resource, or no replica would ever be placed.
    resources = {farm.replica_resource: farm.max_replicas} if farm.replica_resource else None
    ray.init(
        num_cpus=math.ceil(num_cpus),
        num_gpus=num_gpus,
        resources=resources,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
    )
    return True


@contextlib.contextmanager
def ray_session(farm: FarmConfig, num_cpus: float | None = None) -> Iterator[None]:
    """Ray up (:func:`init_ray`, ``num_cpus`` for a local instance) for the block, so that several farms started in
    it share one Ray; shut down at the end if this call started or joined it."""
    owns = init_ray(farm, num_cpus)
    try:
        yield
    finally:
        if owns:
            ray.shutdown()
