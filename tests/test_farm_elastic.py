"""An elastic farm (``farm.replicas = "min..max"``): replicas join as nodes are added and leave with their nodes,
mid-run, and the run is the run a fixed-size farm makes (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from flops_ray.config import AllocatorConfig, EstimatorConfig, FarmConfig, TrainConfig
from flops_ray.data.arrays import digits
from flops_ray.models.factory import create_model
from flops_ray.training.trainer import Trainer

LOOPBACK = {"node_ip_address": "127.0.0.1"}

# A simulated multi-node cluster: slow.
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(ray_env):
    """A head that hosts no replica and one node offering one ``replica`` slot; tests add and remove nodes."""
    c = Cluster(initialize_head=True, head_node_args={**LOOPBACK, "num_cpus": 1})
    first = c.add_node(**LOOPBACK, num_cpus=1, resources={"replica": 1})
    ray.init(address=c.address, _node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    yield c, first
    ray.shutdown()
    c.shutdown()


def _config(workers: int | str, kind: str) -> TrainConfig:
    # SPSA replays sliced: the members of its collective change as replicas join and leave.
    farm = FarmConfig(backend="ray", replicas=workers, shard_cost=16, replica_resource="replica", replay="sliced")
    return TrainConfig(
        model="digits_vit",
        batch_size=8,
        estimator=EstimatorConfig(kind=kind),
        allocator=AllocatorConfig(kind="neyman"),
        farm=farm,
    )


def _wait_for_placement(backend, hang: int) -> None:
    """Block until a waiting replica has been placed and answered its first sync (a deadline only stops a hang)."""
    pending = [s.sync_ref for s in backend.pool.slots if not s.ready and s.sync_ref is not None]
    ready, _ = ray.wait(pending, num_returns=1, timeout=hang)
    assert ready, "no waiting replica was placed on the new node"


@pytest.mark.parametrize("kind", ["lr", "spsa"])
def test_replicas_join_and_leave_mid_run(cluster, inject_fault, hang, kind):
    """Start on one node of ``1..3``; a node joins after step 0 (its replica adopts a live peer's parameters
    and takes work), then the first node is removed in the middle of a step: the parameters are those of a
    fixed-size farm after as many steps (LR's all-reduce, SPSA's sliced replay)."""
    c, first = cluster
    data = digits("train"), None
    with Trainer(_config("1..3", kind), create_model("digits_vit", 10, 8, 0), *data) as trainer:
        backend, pool = trainer.backend, trainer.backend.pool
        assert len(backend.replicas) == 1 and len(pool.slots) == 3, "it starts with the one replica that fits"
        trainer.step()
        c.add_node(**LOOPBACK, num_cpus=1, resources={"replica": 1})
        _wait_for_placement(backend, hang)
        # The placed replica answers its first sync, adopts a peer's state and syncs again: a step or two.
        for _ in range(20):
            if pool.up == 2:
                break
            trainer.step()
        assert pool.up == 2, "the new node's replica should have joined"
        assert backend.counters.state_copies >= 1, "it adopts a live peer's state, not the driver's"
        on_first = {ray.get(s.handle.describe.remote()).node_id == first.node_id: s for s in pool.slots if s.ready}
        joined = on_first[False]
        trainer.step()
        assert ray.get(joined.handle.stats.remote()).tasks > 0, "the joined replica takes shards"

        def remove_first(_) -> None:
            c.remove_node(first)

        inject_fault(backend, after=backend.counters.accepted + 6, action=remove_first)
        trainer.fit(2)
        got = torch.from_numpy(trainer.get_params())
        steps = trainer.step_count
        assert backend.counters.restarts >= 1, "the removed node's replica left mid-run"
        assert pool.current() == [joined], "the joined replica carries the run on"
    with Trainer(_config(1, kind), create_model("digits_vit", 10, 8, 0), *data) as fixed:
        fixed.fit(steps)
        want = torch.from_numpy(fixed.get_params())
    assert torch.allclose(got, want, atol=1e-6), f"max diff {(got - want).abs().max().item():.3g}"
