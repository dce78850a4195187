"""Stage 3 set-up: resolve what each role is built from, and start the roles' actors.

    make_jobs(cfg)           paths resolved (the demo SFT + RM made first when none is given),
                             and each role's job holding only the settings it reads
    start_roles(...)         every actor, named `<role>-<i>`, where --placement puts it
    scale / drop generators  the pool changes a running job asks for or suffers
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coati_ray.algos import NEEDS_CRITIC
from coati_ray.defaults import demo_file
from coati_ray.errors import ConfigError, ModelLoadError
from coati_ray.ppo_config import PPOConfig
from coati_ray.runtime import get_unwrapped, start_actor
from coati_ray.sync import transport_class
from coati_ray.sync.base import WeightSync
from coati_ray.sync.shared import SharedModuleSync
from coati_ray.workers.job import CriticJob, PolicyJob, RolloutJob, UpdateSpec

if TYPE_CHECKING:
    from coati_ray.cluster.ppo_groups import CriticGroup, PolicyGroup

logger = logging.getLogger(__name__)


@dataclass
class PPOJobs:
    policy_path: str  # initial policy; also the frozen reference
    reward_path: str | None  # None when only a function or server scores
    prompt_file: str
    rollout: RolloutJob
    policy: PolicyJob
    critic: CriticJob | None  # None for critic-free estimators
    reward_specs: list = field(default_factory=list)  # RewardSpec of each reward source, in order


def make_jobs(cfg: PPOConfig) -> PPOJobs:
    """Resolve every path (making the demo SFT and RM first when none is given), check them, and
    build each role's job."""
    from coati_ray.models.loading import check_family, model_type

    model, run, ro, obj = cfg.model, cfg.run, cfg.rollout, cfg.objective
    # The paths given first, each a readable model, before the demo models are made (which starts Ray).
    given = (("pretrain", model.pretrain), ("rm_path", run.rm_path), ("critic_pretrain", run.critic_pretrain))
    for name, path in given:
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(name, f"{path}: no such model directory")
            try:
                model_type(path)
            except ModelLoadError as e:
                raise ConfigError(name, f"{path} is not a model directory: {e}") from None
    policy_path, rm_path = model.pretrain, run.rm_path
    wants_rm = cfg.reward.uses_model(rm_path)  # no reward model when only a function or server scores
    if policy_path is None or (wants_rm and rm_path is None):
        from coati_ray.pipelines.demo_models import ensure_demo_models

        demo = ensure_demo_models(model.preset_size, cfg.cluster)
        policy_path, rm_path = policy_path or demo["sft"], rm_path or (demo["rm"] if wants_rm else None)
    reward_specs = cfg.reward.specs(rm_path)
    check_family(model_type(policy_path), model.model, policy_path)
    prompt_file = run.prompt_dataset or demo_file("prompts_train.jsonl")
    pretrain_file = run.pretrain_dataset or (demo_file("pretrain.jsonl") if obj.ptx_coef > 0 else None)
    from coati_ray.data.hub import check_source

    check_source(prompt_file, "prompt_dataset", cfg.data)  # a Hub id or dataset repository is loaded here first
    check_source(pretrain_file, "pretrain_dataset", cfg.data)

    def update(lr: float | None) -> UpdateSpec:  # None: the trainer picks by the model's size (lr_defaults.py)
        return UpdateSpec(run.strategy, lr, run.grad_clip,
                          run.train_batch_size, run.max_epochs, run.seed)

    engine_options = transport_class(ro.vllm_weight_sync).engine_options() if ro.generator_backend == "vllm" else {}
    rollout = RolloutJob(model=model, policy_path=policy_path, prompt_file=prompt_file, data=cfg.data, rollout=ro,
                         objective=obj, seed=run.seed, engine_options=engine_options, reward_specs=reward_specs)
    policy = PolicyJob(model=model, policy_path=policy_path, update=update(run.lr),
                       objective=obj, temperature=ro.temperature, pretrain_file=pretrain_file, data=cfg.data,
                       max_new_tokens=ro.max_new_tokens)
    critic = None
    if NEEDS_CRITIC[obj.advantage_estimator]:
        # the critic starts from the RM (as ColossalChat does); without one, from the policy (a new value head)
        critic = CriticJob(model=model, critic_path=run.critic_pretrain or rm_path or policy_path,
                           tokenizer_path=policy_path,
                           update=update(run.critic_lr),
                           objective=obj, n_samples_per_prompt=ro.n_samples_per_prompt, packing=cfg.data.packing)
    return PPOJobs(policy_path, rm_path, prompt_file, rollout, policy, critic, reward_specs)


PROCESS_GB = 0.6  # one actor process: Python, torch and a small model (each measured at ~0.5 GB on CPU)


def check_plan_fits(cfg: PPOConfig) -> None:
    """Refuse a plan whose actor processes cannot fit this machine's memory, before an embedded Ray
    starts them (64 generators on a 2-core, 24 GB machine started 58 workers, then hung); say how
    much the actors share the cores when they ask for more CPUs than it has."""
    import os

    check_colocate_all(cfg)
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster's nodes, not this machine, hold the actors (and it may autoscale)
    roles = cfg.roles
    critics = roles.critic_trainers if NEEDS_CRITIC[cfg.objective.advantage_estimator] else 0
    n_refs, n_rewards = roles.scoring_actors()
    apart = roles.colocate != "all"  # --colocate all: the trainer ranks' processes hold generators and critics
    processes = (roles.actors + critics) * apart + n_refs + n_rewards + cfg.cluster.trainers + 1
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    need_gb = processes * PROCESS_GB
    if 0.7 * memory_gb < need_gb <= memory_gb:
        logger.warning("%d actor processes need about %.0f GB of this machine's %.0f GB: close to what it has",
                       processes, need_gb, memory_gb)
    if need_gb > memory_gb:
        raise ConfigError("actors", f"{processes} actor processes ({roles.actors} generators, {n_refs} "
                          f"reference, {n_rewards} reward, {critics} critic, {cfg.cluster.trainers} "
                          f"trainer, buffer) need about {processes * PROCESS_GB:.0f} GB ({PROCESS_GB} GB "
                          f"each) but this machine has {memory_gb:.0f} GB; lower --actors or the other counts, "
                          "or join a cluster with --address")
    cores = os.cpu_count() or 1
    cpus = roles.cpus() + cfg.cluster.trainers * (cfg.cluster.cpus_per_trainer or 1.0)
    if cpus > cores:
        logger.warning("the roles reserve %g CPUs on this %d-core machine: %d actor processes share the cores "
                       "(%.1f CPUs reserved per core), so each runs slower than alone", cpus, cores, processes,
                       cpus / cores)


def check_colocate_all(cfg: PPOConfig) -> None:
    """--colocate all puts generator-r and critic rank r in trainer rank r's process, sampling with its module."""
    roles, cluster, ro = cfg.roles, cfg.cluster, cfg.rollout
    if roles.colocate != "all":
        return
    n, critic = cluster.trainers, NEEDS_CRITIC[cfg.objective.advantage_estimator]  # no critic: its count is unread
    for flag, got, want in (("actors", roles.actors, n), ("critic_trainers", roles.critic_trainers if critic else n, n),
                            ("generator_backend", ro.generator_backend, "hf"), ("strategy", cfg.run.strategy, "ddp")):
        if got != want:
            why = "each trainer rank generates" if flag == "actors" else \
                "each trainer rank holds its critic rank" if flag == "critic_trainers" else \
                "the generator samples with the trainer's own (unsharded) module"
            raise ConfigError(flag, f"--colocate all needs {want} ({why}); got {got}")


def count_prompts(jobs: PPOJobs) -> int:
    """Read and check the prompt file here, before any actor starts (errors name file, line, field)."""
    from coati_ray.data.loading import load_rows, prompt_columns

    data = jobs.rollout.data
    return len(load_rows(jobs.prompt_file, prompt_columns(data.keys()), data.skip_bad_rows,
                         **data.hub_options("prompt_dataset")).dataset)


@dataclass
class Roles:
    buffer: Any  # also the job's control mailbox (cluster/control.py JobBuffer): `control` below
    references: list
    rewards: list
    generators: dict[int, Any]  # index -> handle: the generators started and not retired
    policy: PolicyGroup
    critic: CriticGroup | None
    start_generator: Any  # index -> handle of a new generator actor named generator-<index>
    sync: WeightSync  # how new weights reach the generators

    @property
    def control(self):
        """The job's control mailbox: the buffer actor holds it."""
        return self.buffer

    def shutdown(self) -> None:
        import ray

        for g in (self.policy, self.critic):
            if g is not None:
                g.shutdown()
        for a in [self.buffer, *self.references, *self.rewards, *self.generators.values()]:
            ray.kill(a)

    def placement(self) -> dict[str, str]:
        """Actor name -> the Ray node it runs on."""
        named = {**{f"generator-{i}": g for i, g in self.generators.items()}, "buffer-0": self.buffer,
                 **{f"reference-{i}": a for i, a in enumerate(self.references)},
                 **{f"reward-{i}": a for i, a in enumerate(self.rewards)}}
        out = dict(zip(named, get_unwrapped([a.node_id.remote() for a in named.values()])))
        for prefix, group in (("trainer", self.policy), ("critic", self.critic)):
            if group is not None:
                out.update({f"{prefix}-{r}": n for r, n in enumerate(group.node_ids())})
        return out


def generator_placement(cfg: PPOConfig, resources: dict | None) -> dict:
    """Ray options of one generator actor.

    Generators are spread over the nodes that may hold them. A vLLM engine with tensor-parallel
    size k > 1 gets its own placement group of k bundles (one GPU and the generator's CPUs each,
    packed onto one node when possible): the actor holds no GPU itself and vLLM's Ray executor
    starts its k workers in the group's bundles.
    """
    roles, ro = cfg.roles, cfg.rollout
    tp = ro.vllm_tensor_parallel_size if ro.generator_backend == "vllm" else 1
    if tp == 1:  # SPREAD: generators go to different nodes when they can (one node's failure costs less)
        return {"num_cpus": roles.generator_cpus, "num_gpus": roles.generator_gpus, "resources": resources,
                "scheduling_strategy": "SPREAD"}
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"GPU": 1.0, "CPU": roles.generator_cpus, **(resources or {})} for _ in range(tp)],
                         strategy="PACK")
    return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def start_roles(cfg: PPOConfig, jobs: PPOJobs, n_prompts: int) -> Roles:
    """Start every role's actors (each named `<role>-<i>`) where `--placement` puts them.

    Generators, references and rewards are restarted by Ray after a crash (`--max_restarts`;
    generators only where the weight-sync transport lets a restarted one catch up); calls to a
    restarting reference or reward are retried by Ray, and a generator's chunk in flight is issued
    again by the buffer. Trainers are not restarted: their state dies with them.
    """
    import ray

    from coati_ray.cluster.control import JobBuffer
    from coati_ray.cluster.placement import role_resources
    from coati_ray.cluster.ppo_groups import CriticGroup, HybridGroup, PolicyGroup
    from coati_ray.workers.chunks import StepPlan
    from coati_ray.workers.shells import GeneratorWorker, ReferenceWorker, RewardWorker  # torch-free handles

    roles, cluster = cfg.roles, cfg.cluster
    res, fam, dt = role_resources(roles, ray.cluster_resources()), cfg.model.model, cfg.model.dtype
    sync_cls = transport_class(cfg.rollout.vllm_weight_sync)
    restart = {"max_restarts": roles.max_restarts, "max_task_retries": -1}

    def scoring_args(ref_threads: int, reward_threads: int) -> tuple[tuple, tuple]:
        """ReferenceWorker's and RewardWorker's arguments (their constructors set their process's threads)."""
        return ((jobs.policy_path, fam, dt, ref_threads, cfg.data.packing),
                (jobs.reward_specs, fam, dt, reward_threads, cfg.reward.remote_options(), cfg.data.packing))

    ref_args, reward_args = scoring_args(int(roles.reference_cpus), int(roles.reward_cpus))
    n_refs, n_rewards = roles.scoring_actors()  # none with --colocate rollout: the generators score
    refs = [start_actor(ReferenceWorker, f"reference-{i}", ref_args,
                        roles.reference_cpus, roles.reference_gpus, res.get("reference"), **restart)
            for i in range(n_refs)]
    rewards = [start_actor(RewardWorker, f"reward-{i}", reward_args,
                           roles.reward_cpus, roles.reward_gpus, res.get("reward"), **restart)
               for i in range(n_rewards)]
    # --colocate rollout: both built inside each generator, at the generator's threads
    scorers = None if refs else scoring_args(int(roles.generator_cpus), int(roles.generator_cpus))

    def start_generator(i: int):
        # The buffer, not Ray, issues a dead generator's chunk again (to whichever generator is free).
        args = (i, jobs.rollout, [f"reference-{k}" for k in range(n_refs)], [f"reward-{k}" for k in range(n_rewards)],
                int(roles.generator_cpus), scorers)
        return start_actor(GeneratorWorker, f"generator-{i}", args,
                           max_restarts=roles.max_restarts if sync_cls.restartable_generators else 0,
                           max_task_retries=0, **generator_placement(cfg, res.get("generator")))

    if roles.colocate == "all":  # trainer rank r's process also holds generator-r and critic rank r
        policy = HybridGroup(cluster.trainers, cluster.cpus_per_trainer or 1.0, cluster.gpus_per_trainer,
                             name_prefix="trainer", resources=res.get("trainer"), connect=False)
        critic = policy.critic_group() if jobs.critic else None
        gens = policy.start_generators(jobs.rollout, scoring_args(*[int(cluster.cpus_per_trainer or 1)] * 2))
        sync_cls = SharedModuleSync
    else:
        gens = {i: start_generator(i) for i in range(roles.actors)}
        # The trainer groups' processes start while the generators load (start-up is mostly imports and
        # loads, which overlap); then every constructor is waited for, and a failing one surfaces here.
        policy = PolicyGroup(cluster.trainers, cluster.cpus_per_trainer or 1.0, cluster.gpus_per_trainer,
                             name_prefix="trainer", resources=res.get("trainer"), connect=False)
        critic = CriticGroup(roles.critic_trainers, roles.critic_cpus, roles.critic_gpus, name_prefix="critic",
                             resources=res.get("critic"), connect=False) if jobs.critic else None
    plan = StepPlan(n_prompts, cfg.rollout.experience_batch_size, cfg.rollout.n_samples_per_prompt, cfg.run.seed)
    # the buffer is also the job's control mailbox (launchers/control.py reaches it by name)
    buffer = start_actor(JobBuffer, "buffer-0", (cfg.buffer_capacity(), plan, gens, Path(cfg.run.save_path).name),
                         num_cpus=0, resources=res.get("buffer"), max_concurrency=JobBuffer.MAX_CONCURRENCY)
    roles_up = Roles(buffer, refs, rewards, gens, policy, critic, start_generator, sync_cls(policy))
    try:
        get_unwrapped([g.weight_version.remote() for g in gens.values()])
        for group in (policy, critic):
            if group is not None:
                group.connect()
    except BaseException:  # nothing is left holding CPUs or placement groups in a shared Ray
        roles_up.shutdown()
        raise
    return roles_up


def scale_generators(actors: Roles, target: int | None) -> None:
    """Start or retire generators until `target` run (a request from `launchers/control.py`).

    New generators join the buffer's pool as soon as they are constructed (a pending one waits
    for a node: on an autoscaling cluster its demand makes the autoscaler add a rollout node).
    Retired ones finish the chunk they are making first, then are killed.
    """
    import ray

    have = len(actors.generators)
    if target is None or target == have:
        return
    if not actors.sync.scalable:
        logger.warning("scaling to %d generators refused: the weight-sync transport (--vllm_weight_sync) fixes "
                       "the generators at start-up", target)
        return
    if target > have:
        first = max(actors.generators) + 1
        new = {i: actors.start_generator(i) for i in range(first, first + target - have)}
        actors.generators.update(new)
        for i, h in new.items():
            actors.sync.on_generator_added(i, h)
        get_unwrapped(actors.buffer.add_generators.remote(new))
        logger.info("scaling: starting generators %s (%d requested)", sorted(new), target)
    else:
        retire = sorted(actors.generators)[target - have:]
        gone = get_unwrapped(actors.buffer.retire_generators.remote(retire))
        for i in gone:
            ray.kill(actors.generators.pop(i))
            actors.sync.on_generator_removed(i)
        logger.info("scaling: retired generators %s (%d requested)", gone, target)


def drop_lost_generators(actors: Roles) -> None:
    """Forget the generators the buffer gave up on (restarts used up, or never started), so the
    weight sync, the sync check and the reported count use live ones only."""
    import ray

    for i in get_unwrapped(actors.buffer.lost_generators.remote()):
        handle = actors.generators.pop(i, None)
        actors.sync.on_generator_removed(i)  # raises where the transport cannot go on without it
        if handle is not None:
            ray.kill(handle)  # frees what it still holds if it hangs rather than died
        logger.warning("generator-%d is gone for good; %d generators left", i, len(actors.generators))
