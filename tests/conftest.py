"""Ray fixtures shared by the farm tests: one real local Ray per test module, isolated from the user's."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Ray reads this at import, and test modules import ray at collection, before any fixture runs:
# without it a driver connecting to a loopback ``Cluster`` hangs (RAY_NOTES trap 1).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module")
def ray_env():
    """Isolate ``HOME`` and ``RAY_TMPDIR`` (Ray writes its auth token and sessions there) and keep Ray on loopback."""
    root = tempfile.mkdtemp(prefix="rayt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", root)
        mp.setenv("RAY_TMPDIR", root)
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_DEDUP_LOGS", "0")
        # A job started from a test must start its own Ray, not join one named by the environment.
        mp.delenv("RAY_ADDRESS", raising=False)
        yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local(ray_env):
    """A local Ray with 4 logical CPUs and one fake GPU (GPU scheduling is testable on CPU)."""
    import ray

    ray.init(num_cpus=4, num_gpus=1, _node_ip_address="127.0.0.1", include_dashboard=False)
    yield
    ray.shutdown()
