"""TrainerGroup.dead_ranks on a real local Ray cluster: which trainer ranks are dead.

The PPO driver asks this after a failed step to tell a dead trainer (the run must stop and resume
from its checkpoint) from any other error.
"""

from __future__ import annotations

import re

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


def test_a_rank_stuck_in_a_collective_becomes_an_error_that_names_it(ray_cluster):
    """Issue 15: a stuck collective must become an error, not silence. Rank 0 enters a barrier that
    rank 1 never joins; the group call gives up after the watchdog and names the stuck call."""
    import pytest

    from coati_ray.cluster.group import TrainerGroup
    from coati_ray.runtime import StuckError, get_all

    ray = ray_cluster
    group = TrainerGroup(2, cpus_per_trainer=0.5, name_prefix="stuckcheck")
    try:
        stuck = [group.workers[0].barrier.remote()]  # rank 1 never calls barrier: rank 0 waits in gloo
        with pytest.raises(StuckError) as e:
            get_all(stuck, ["stuckcheck-0.barrier"], timeout_s=3.0)
        # the stuck rank, its state and how busy it is: waiting in gloo takes (almost) no CPU
        m = re.match(r"waited 3 s for stuckcheck-0\.barrier \(ALIVE, pid \d+, (\d+)% CPU\) \(0 of 1 finished\)",
                     str(e.value))
        assert m, str(e.value)
        assert int(m.group(1)) < 50, str(e.value)
        assert group.labels("evaluate") == ["stuckcheck-0.evaluate", "stuckcheck-1.evaluate"]
        assert get_all([group.workers[1].node_id.remote()], timeout_s=30.0)  # the free rank still answers
    finally:
        for w in group.workers:
            ray.kill(w, no_restart=True)
        ray.util.remove_placement_group(group.pg)


def test_a_placement_ray_cannot_reserve_becomes_an_error_that_names_it(ray_cluster, monkeypatch):
    """A trainer group's placement group waits for resources (an autoscaler may add a node), but
    not forever: past the watchdog it is a StuckError naming the bundles and what is free."""
    import pytest

    from coati_ray.cluster.placement import reserve_packed
    from coati_ray.runtime import StuckError

    monkeypatch.setenv("COATI_WATCHDOG_S", "2")
    with pytest.raises(StuckError) as e:
        reserve_packed([{"CPU": 1000.0}], "test group", log_every_s=1.0)
    assert str(e.value).startswith("placement: test group waited 2 s for [{'CPU': 1000.0}]"), str(e.value)
    assert "the cluster has {" in str(e.value)
