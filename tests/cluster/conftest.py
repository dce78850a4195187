"""One simulated multi-node cluster for every test in tests/cluster (package scope).

This package runs before tests/ray and the others (alphabetical), and its cluster is shut down
when its last test is done, so the single-node `ray_cluster` of the other packages starts
afterwards (one Ray per process at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from coati_ray.cluster.placement import ROLLOUT, TRAINER

# cluster.yaml's node types, scaled down: 3 logical CPUs per worker node, all sharing this machine
NODES = [{"num_cpus": 3, "resources": {ROLLOUT: 1}}, {"num_cpus": 3, "resources": {ROLLOUT: 1}},
         {"num_cpus": 3, "resources": {TRAINER: 1}}, {"num_cpus": 3, "resources": {TRAINER: 1}}]


@dataclass
class Sim:
    ray: object
    address: str
    dashboard_url: str
    metrics_urls: list[str]
    session_dir: str  # the head's session directory (Ray's Prometheus service-discovery file is in it)


@pytest.fixture(scope="package")
def sim():
    import ray

    from coati_ray.testing.simulated_cluster import start_sim_cluster

    if ray.is_initialized():  # a test of another package ran first (e.g. with -k): one Ray at a time
        ray.shutdown()
    cluster = start_sim_cluster(NODES, head_cpus=2, connect=False)
    ray.init(address=cluster.cluster.address, namespace="coati_ray_tests", logging_level="ERROR")
    cluster.connected = True
    yield Sim(ray, cluster.cluster.address, cluster.dashboard_url, cluster.metrics_urls,
              cluster.cluster.head_node.get_session_dir_path())
    cluster.shutdown()
