"""Losing a node mid-run slows the farm down, never breaks it (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from flops_ray.config import AllocatorConfig, FarmConfig, TrainConfig
from flops_ray.data.arrays import digits
from flops_ray.models.factory import create_model
from flops_ray.training.trainer import Trainer

LOOPBACK = {"node_ip_address": "127.0.0.1"}


# A simulated multi-node cluster: slow.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(ray_env):
    """A head that hosts no replica and three one-CPU nodes that each offer one ``replica`` slot."""
    c = Cluster(initialize_head=True, head_node_args={**LOOPBACK, "num_cpus": 1})
    nodes = [c.add_node(**LOOPBACK, num_cpus=1, resources={"replica": 1}) for _ in range(3)]
    ray.init(address=c.address, _node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_node_removed_mid_step(cluster, inject_fault):
    c, nodes = cluster
    cfg = TrainConfig(
        model="digits_vit",
        batch_size=8,
        allocator=AllocatorConfig(kind="neyman"),
        farm=FarmConfig(backend="ray", replicas=3, shard_cost=16, replica_resource="replica"),
    )
    data = digits("train"), None
    with Trainer(cfg.replace(farm=FarmConfig()), create_model("digits_vit", 10, 8, 0), *data) as local:
        local.fit(3)
        want = torch.from_numpy(local.get_params())

    with Trainer(cfg, create_model("digits_vit", 10, 8, 0), *data) as trainer:
        infos = trainer.backend.describe()
        assert len({i.node_id for i in infos}) == 3, "replica_resource caps replicas at one per node"
        removed: list[str] = []

        def remove_busiest_node(backend) -> None:
            node_id = infos[backend.pool.busiest()].node_id
            c.remove_node(next(n for n in nodes if n.node_id == node_id))
            removed.append(node_id)

        trainer.step()
        backend = trainer.backend
        inject_fault(backend, after=backend.counters.accepted + 8, action=remove_busiest_node)
        trainer.fit(2)
        got = torch.from_numpy(trainer.get_params())
        c_ = backend.counters
        assert removed and c_.restarts == 1 and c_.retried >= 1
        # The successor cannot be placed (no node has a free replica slot); the survivors did the work.
        assert sum(not s.ready for s in backend.pool.slots) == 1
    assert torch.allclose(got, want, atol=1e-6)
