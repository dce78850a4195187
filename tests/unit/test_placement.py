"""Which resources each role asks for (--placement), and how a step is cut into chunks."""

from __future__ import annotations

import pytest

from coati_ray.cluster.placement import HEAD_RESOURCE, MARKER_AMOUNT, ROLE_NODE, role_resources
from coati_ray.ppo_config import RoleArgs
from coati_ray.workers.chunks import make_chunks, step_prompts, steps_per_episode


def test_auto_placement_leaves_a_cluster_without_markers_alone():
    assert role_resources(RoleArgs(), {"CPU": 16.0}) == {}


@pytest.mark.parametrize("available", [{"CPU": 8.0, "rollout": 2.0}, {"CPU": 8.0, "trainer": 1.0}])
def test_auto_placement_uses_node_types_once_any_marker_is_there(available):
    res = role_resources(RoleArgs(), available)
    for role, marker in ROLE_NODE.items():
        assert res[role] == {marker: MARKER_AMOUNT}
    assert res["buffer"] == {HEAD_RESOURCE: MARKER_AMOUNT}  # which also holds the job's control
    assert "control" not in res


def test_placement_flags_rename_force_or_switch_off_the_markers():
    roles = RoleArgs(placement="nodes", rollout_resource="gpu_small", trainer_resource="gpu_big",
                     custom_resources='{"generator": {"a100": 1}}')
    res = role_resources(roles, {"CPU": 4.0})  # 'nodes' asks even before such a node joins
    assert res["generator"] == {"a100": 1, "gpu_small": MARKER_AMOUNT}
    assert res["critic"] == {"gpu_big": MARKER_AMOUNT}
    off = role_resources(RoleArgs(placement="none", custom_resources='{"reward": {"x": 1}}'),
                         {"rollout": 1.0, "trainer": 1.0})
    assert off == {"reward": {"x": 1}}


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 5, 8])
def test_a_step_has_the_same_sample_ids_however_it_is_cut(num_chunks):
    rows = step_prompts(3, n_prompts=50, experience_batch_size=5, seed=7)
    chunks = make_chunks(3, rows, num_chunks, n_samples=2)
    assert len(chunks) == min(num_chunks, 5)
    assert [r for c in chunks for r in c.rows] == rows
    assert [i for c in chunks for i in c.sample_ids()] == list(range(30, 40))  # step 3: ids 3*10 .. 3*10+9


def test_an_episode_visits_every_prompt_once_in_a_seeded_order():
    n, b = 23, 4
    spe = steps_per_episode(n, b)
    episode = [r for s in range(spe) for r in step_prompts(s, n, b, seed=1)]
    assert spe == 5 and len(set(episode)) == len(episode) == 20 and set(episode) <= set(range(n))
    assert step_prompts(spe, n, b, seed=1) != step_prompts(0, n, b, seed=1)  # reshuffled next episode
    assert step_prompts(2, n, b, seed=1) == step_prompts(2, n, b, seed=1)
    assert step_prompts(2, n, b, seed=1) != step_prompts(2, n, b, seed=2)


def test_colocated_rollout_starts_no_scoring_actors_and_refuses_their_counts():
    from coati_ray.errors import ConfigError

    apart, together = RoleArgs(actors=2), RoleArgs(actors=2, colocate="rollout")
    assert apart.scoring_actors() == (1, 1) and together.scoring_actors() == (0, 0)
    assert apart.cpus() == 2 + 1 + 1 + 1 and together.cpus() == 2 + 1  # generators + critic only
    together.validate()
    with pytest.raises(ConfigError, match="--ref_workers: has no effect with --colocate rollout"):
        RoleArgs(colocate="rollout", ref_workers=2).validate()


@pytest.mark.parametrize(("flags", "message"), [
    ({"actors": 2}, "--actors: --colocate all needs 1 (each trainer rank generates); got 2"),
    ({"critic_trainers": 2}, "--critic_trainers: --colocate all needs 1 (each trainer rank holds its critic rank)"),
    ({"strategy": "fsdp"}, "--strategy: --colocate all needs ddp"),
    ({"generator_backend": "vllm"}, "--generator_backend: --colocate all needs hf"),
])
def test_colocate_all_refuses_a_plan_whose_roles_do_not_line_up_with_the_trainer_ranks(flags, message):
    from coati_ray.errors import ConfigError
    from coati_ray.pipelines.ppo_roles import check_plan_fits
    from coati_ray.ppo_config import PPOConfig

    cfg = PPOConfig.of(colocate="all", **flags)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_plan_fits(cfg)
    both = PPOConfig.of(colocate="all", trainers=2, actors=2, critic_trainers=2, train_batch_size=4)
    check_plan_fits(both)  # two ranks, each with its generator and critic rank
    check_plan_fits(PPOConfig.of(colocate="all", trainers=2, actors=2, advantage_estimator="grpo",
                                 n_samples_per_prompt=2, train_batch_size=4))  # no critic: its count is not read
    assert both.roles.cpus() == 0.0 and both.roles.scoring_actors() == (0, 0)  # the trainers' CPUs are all
