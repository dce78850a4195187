"""TrainerGroup.dead_ranks on a real local Ray cluster: which trainer ranks are dead.

The PPO driver asks this after a failed step to tell a dead trainer (the run must stop and resume
from its checkpoint) from any other error.
"""

from __future__ import annotations

from helpers import wait_dead


def test_dead_ranks_names_exactly_the_killed_ranks(ray_cluster):
    from coati_ray.cluster.group import TrainerGroup

    ray = ray_cluster
    group = TrainerGroup(3, cpus_per_trainer=0.5, name_prefix="deadcheck")
    try:
        assert group.dead_ranks() == []
        for rank in (2, 0):
            ray.kill(group.workers[rank], no_restart=True)
            assert wait_dead(ray, group.workers[rank], "node_id")  # ray.kill is asynchronous
        assert group.dead_ranks(timeout_s=5.0) == [0, 2]
    finally:
        for w in group.workers:
            ray.kill(w, no_restart=True)
        ray.util.remove_placement_group(group.pg)
