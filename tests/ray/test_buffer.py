"""The replay buffer with real generator, reference and reward actors on a local Ray cluster."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import wait_dead

from coati_ray.config import ModelArgs, PromptDataArgs
from coati_ray.experience import Experience
from coati_ray.ppo_config import ObjectiveArgs, RolloutArgs
from coati_ray.rewards.sources import reward_specs
from coati_ray.runtime import start_actor
from coati_ray.sync.object_store import StoreTicket
from coati_ray.workers.buffer import ReplayBuffer
from coati_ray.workers.chunks import StepPlan
from coati_ray.workers.generator import GeneratorWorker
from coati_ray.workers.job import RolloutJob
from coati_ray.workers.reference import ReferenceWorker
from coati_ray.workers.reward import RewardWorker

PROMPTS_PER_STEP, SAMPLES = 4, 2  # one step = 8 samples
N_PROMPTS = 40  # rows of the plan (the demo prompt file has more)
START = StoreTicket(0)  # weights version 0: what every generator starts with


@pytest.fixture(scope="module")
def scorers(ray_cluster, micro_model):
    ref = start_actor(ReferenceWorker, "test-reference-0", (micro_model,), num_cpus=0.5)
    rew = start_actor(RewardWorker, "test-reward-0", (reward_specs(micro_model, None, None, None),), num_cpus=0.5)
    yield [ref], [rew]
    for a in (ref, rew):
        ray_cluster.kill(a)


def make_job(micro_model, demo_dir) -> RolloutJob:
    rollout = RolloutArgs(experience_batch_size=PROMPTS_PER_STEP, n_samples_per_prompt=SAMPLES, max_new_tokens=6)
    return RolloutJob(model=ModelArgs(pretrain=micro_model), policy_path=micro_model,
                      prompt_file=str(demo_dir / "prompts_train.jsonl"), data=PromptDataArgs(), rollout=rollout,
                      objective=ObjectiveArgs(advantage_estimator="grpo"), seed=42, engine_options={},
                      reward_specs=reward_specs(micro_model, None, None, None))


def start_generator(ray, job, scorers, name, index=0, **options):
    gen = start_actor(GeneratorWorker, f"{name}-generator-{index}", (index, job, *scorers), num_cpus=0.5, **options)
    ray.get(gen.weight_version.remote())  # constructed
    return gen


def make_parts(ray, micro_model, demo_dir, scorers, name, limit, n_generators=1, **options):
    job = make_job(micro_model, demo_dir)
    gens = {i: start_generator(ray, job, scorers, name, i, **options) for i in range(n_generators)}
    plan = StepPlan(N_PROMPTS, PROMPTS_PER_STEP, SAMPLES, seed=42)
    buf = start_actor(ReplayBuffer, f"{name}-buffer-0", (limit, plan, gens), num_cpus=0,
                      max_concurrency=ReplayBuffer.MAX_CONCURRENCY)
    return (gens[0] if n_generators == 1 else gens), buf


def wait_until(ray, buf, key, value, timeout_s: float = 120.0):
    """Poll the buffer's own counters (no fixed sleeps): returns once stats[key] == value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = ray.get(buf.stats.remote())
        if stats[key] == value:
            return stats
        ray.get(buf.stats.remote())  # one more round trip before the next look (no fixed sleep)
    raise AssertionError(f"buffer stats[{key!r}] is {stats[key]}, not {value}, after {timeout_s} s")


def test_a_full_buffer_makes_the_producer_wait(ray_cluster, micro_model, demo_dir, scorers):
    ray = ray_cluster
    gen, buf = make_parts(ray, micro_model, demo_dir, scorers, "bp", limit=PROMPTS_PER_STEP * SAMPLES)
    p0 = buf.produce.remote(0, 0, START, 0.0)
    p1 = buf.produce.remote(1, 0, START, 0.0)
    ray.get(p0)
    stats = wait_until(ray, buf, "buffer/queued_chunks", 1)  # step 1's chunk waits for room
    assert stats["buffer/waiting_producers"] == 1
    # Step 1 was not even dispatched: the generator made exactly one rollout, the buffer holds one step.
    assert ray.get(gen.rollouts_done.remote()) == 1
    assert stats["buffer/rollouts_dispatched"] == 1 and stats["buffer/fill"] == 8
    taken = ray.get(buf.take.remote(0, 8))
    ray.get(p1)  # room again: step 1 is produced
    assert ray.get(gen.rollouts_done.remote()) == 2
    later = ray.get(buf.take.remote(1, 8))
    ids0 = [i for _, m in taken for i in m.sample_ids]
    ids1 = [i for _, m in later for i in m.sample_ids]
    assert sorted(ids0) == list(range(8)) and sorted(ids1) == list(range(8, 16))
    assert all(m.version == 0 for _, m in taken + later)
    stats = ray.get(buf.stats.remote())
    assert stats["generators/wait_buffer_s"] > 0  # the idle generator waited on the full buffer


def test_generators_join_and_retire_while_steps_run(ray_cluster, micro_model, demo_dir, scorers):
    ray = ray_cluster
    gen, buf = make_parts(ray, micro_model, demo_dir, scorers, "scale", limit=64)
    ray.get(buf.produce.remote(0, 0, START, 0.0))
    new = start_actor(GeneratorWorker, "scale-generator-1", (1, make_job(micro_model, demo_dir), *scorers),
                      num_cpus=0.5)
    ray.get(buf.add_generators.remote({1: new}))  # returns at once; the generator joins once constructed
    wait_until(ray, buf, "generators/pooled", 2)
    ray.get(buf.produce.remote(1, 0, START, 0.0))  # split between both generators
    assert ray.get(buf.retire_generators.remote([0])) == [0]
    ray.get(buf.produce.remote(2, 0, START, 0.0))  # only generator 1 is left
    steps = [ray.get(buf.take.remote(s, 8)) for s in range(3)]
    assert [sorted(m.generator for _, m in t) for t in steps] == [[0], [0, 1], [1]]
    for s, taken in enumerate(steps):  # every sample of every step exactly once, whoever made it
        assert sorted(i for _, m in taken for i in m.sample_ids) == list(range(8 * s, 8 * s + 8))
    stats = ray.get(buf.stats.remote())
    assert stats["buffer/generators_added"] == 1 and stats["buffer/generators_retired"] == 1
    with pytest.raises(ray.exceptions.RayTaskError, match="at least one"):
        ray.get(buf.retire_generators.remote([1]))


def test_a_chunk_in_flight_on_a_crashed_generator_is_issued_again(ray_cluster, micro_model, demo_dir, scorers):
    ray = ray_cluster
    gen, buf = make_parts(ray, micro_model, demo_dir, scorers, "crash", limit=64, max_restarts=3)
    reissued, step = 0, 0
    while reissued == 0 and step < 3:  # the kill must land while a rollout runs: look again if it missed
        p = buf.produce.remote(step, 0, START, 0.0)
        wait_until(ray, buf, "buffer/reserved", 8)  # dispatched, in flight
        ray.kill(gen, no_restart=False)  # a crash: Ray restarts the actor
        ray.get(p)
        taken = ray.get(buf.take.remote(step, 8))
        assert sorted(i for _, m in taken for i in m.sample_ids) == list(range(8 * step, 8 * step + 8))
        reissued = ray.get(buf.stats.remote())["buffer/reissued"]
        step += 1
    stats = ray.get(buf.stats.remote())
    assert reissued == 8 and stats["buffer/generator_restarts"] == 1
    assert stats["buffer/accepted"] == stats["buffer/taken"] == 8 * step  # nothing made twice


def test_accepted_experience_survives_the_death_of_its_generator(ray_cluster, micro_model, demo_dir, scorers):
    ray = ray_cluster
    gen, buf = make_parts(ray, micro_model, demo_dir, scorers, "own", limit=64)
    ray.get(buf.produce.remote(0, 0, START, 0.0))  # returns once the chunk is accepted
    ray.kill(gen, no_restart=True)
    assert wait_dead(ray, gen, "rollouts_done")  # the generator is gone ...
    (ref, meta), = ray.get(buf.take.remote(0, 8))
    exp: Experience = ray.get(ref)  # ... its experience is not: the buffer owns it
    assert exp.size == 8 and exp.sample_ids.tolist() == meta.sample_ids
    assert exp.ref_log_probs is not None and exp.advantages is not None
    assert torch.isfinite(exp.log_probs).all()


def test_chunks_older_than_allowed_are_dropped_and_counted(ray_cluster, micro_model, demo_dir, scorers):
    ray = ray_cluster
    gen, buf = make_parts(ray, micro_model, demo_dir, scorers, "stale", limit=64)
    for step in range(3):
        ray.get(buf.produce.remote(step, 0, START, 0.0))
    # Taking step 1 drops the never-taken step 0 ...
    (_, meta), = ray.get(buf.take.remote(1, 8, 0))
    assert meta.step == 1 and ray.get(buf.stats.remote())["buffer/dropped_stale"] == 8
    # ... and a trainer at v1 that accepts nothing older drops step 2 (made with v0) and keeps waiting.
    pending = buf.take.remote(2, 8, 1)
    stats = wait_until(ray, buf, "buffer/dropped_stale", 16)
    ready, _ = ray.wait([pending], timeout=0)
    assert not ready and stats["buffer/fill"] == 0 and stats["buffer/taken"] == 8


def test_a_failed_rollout_surfaces_in_take(ray_cluster, micro_model, demo_dir, scorers):
    ray = ray_cluster
    gen, buf = make_parts(ray, micro_model, demo_dir, scorers, "fail", limit=64)
    ray.kill(gen, no_restart=True)
    buf.produce.remote(0, 0, START, 0.0)
    with pytest.raises(ray.exceptions.RayError):
        ray.get(buf.take.remote(0, 8))  # not a hang: the generator's death reaches the trainer side
    assert ray.get(buf.lost_generators.remote()) == [0]  # the driver forgets it (and is told once)
    assert ray.get(buf.lost_generators.remote()) == []
