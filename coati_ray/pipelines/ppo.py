"""The stage-3 driver: PPO (+PTX) with every role a Ray actor. The driver holds no experience data.

One step s (policy weights v = s; on-policy unless --max_staleness k > 0):
    1. launch rollouts: every generator makes its share of step d's experience for each d <= v + k
    2. take step s's chunks from the replay buffer (ObjectRefs only)
    3. critic: values -> GAE advantages and returns (gae only; grpo/rloo did theirs in the generator)
    4. update: policy (PPO + PTX) and critic (value loss) at once, max_epochs over the step's samples
    5. sync: trainer rank 0 publishes weights v + 1 once into the object store; each generator loads
       them before its next rollout (on-policy: the driver waits for the loads)
    6. KL controller, metrics line, TensorBoard, checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coati_ray.algos.advantages import NEEDS_CRITIC
from coati_ray.algos.kl import make_kl_controller
from coati_ray.runtime import get_all, get_restartable, get_unwrapped, start_actor
from coati_ray.cluster.ppo_groups import CriticGroup, PolicyGroup
from coati_ray.cluster.ray_env import init_ray
from coati_ray.config import (
    ClusterArgs,
    DataArgs,
    ModelArgs,
    PPOArgs,
    RoleArgs,
    validate_all,
)
from coati_ray.defaults import demo_file
from coati_ray.errors import ConfigError, DataError
from coati_ray.workers.job import PPOJob

logger = logging.getLogger(__name__)


@dataclass
class PPOResult:
    save_path: str
    total_steps: int
    start_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # metrics of every step run
    trained_ids: list[list[list[int]]] = field(default_factory=list)  # [step][epoch] ids trained (all ranks)
    made_ids: list[list[int]] = field(default_factory=list)  # [step] ids of the experience taken
    trained_versions: list[list[int]] = field(default_factory=list)  # [step] weight version per sample
    made_by: list[list[int]] = field(default_factory=list)  # [step] generator index of each chunk
    placement: dict[str, str] = field(default_factory=dict)  # actor name -> Ray node id


@dataclass
class Roles:
    buffer: Any
    control: Any
    references: list
    rewards: list
    generators: dict[int, Any]  # index -> handle: the generators started and not retired
    policy: PolicyGroup
    critic: CriticGroup | None
    start_generator: Any  # index -> handle of a new generator actor named generator-<index>

    def shutdown(self) -> None:
        import ray

        for g in (self.policy, self.critic):
            if g is not None:
                g.shutdown()
        for a in [self.buffer, self.control, *self.references, *self.rewards, *self.generators.values()]:
            ray.kill(a)

    def placement(self) -> dict[str, str]:
        """Actor name -> the Ray node it runs on."""
        named = {**{f"generator-{i}": g for i, g in self.generators.items()}, "buffer-0": self.buffer,
                 "control": self.control, **{f"reference-{i}": a for i, a in enumerate(self.references)},
                 **{f"reward-{i}": a for i, a in enumerate(self.rewards)}}
        out = dict(zip(named, get_unwrapped([a.node_id.remote() for a in named.values()])))
        for prefix, group in (("trainer", self.policy), ("critic", self.critic)):
            if group is not None:
                out.update({f"{prefix}-{r}": n for r, n in enumerate(group.node_ids())})
        return out


def make_ppo_job(model: ModelArgs, data: DataArgs, ppo: PPOArgs, roles: RoleArgs, cluster: ClusterArgs) -> PPOJob:
    """Resolve every path (making the demo SFT and RM first when none is given) and check them."""
    from coati_ray.models.loading import check_family, load_config

    policy_path, rm_path = model.pretrain, ppo.rm_path
    if policy_path is None or rm_path is None:
        from coati_ray.pipelines.demo import ensure_demo_models

        demo = ensure_demo_models(model.preset_size, cluster)
        policy_path, rm_path = policy_path or demo["sft"], rm_path or demo["rm"]
    for name, path in (("pretrain", policy_path), ("rm_path", rm_path), ("critic_pretrain", ppo.critic_pretrain)):
        if path is not None and not Path(path).exists():
            raise ConfigError(name, f"{path}: no such model directory")
    check_family(load_config(policy_path), model.model, policy_path)
    critic_path = (ppo.critic_pretrain or rm_path) if NEEDS_CRITIC[ppo.advantage_estimator] else None
    prompt_file = ppo.prompt_dataset or demo_file("prompts_train.jsonl")
    pretrain_file = ppo.pretrain_dataset or (demo_file("pretrain.jsonl") if ppo.ptx_coef > 0 else None)
    for f in (prompt_file, pretrain_file):
        if f and not Path(f).exists():
            raise DataError(f, "no such file or directory")
    return PPOJob(policy_path, rm_path, critic_path, prompt_file, pretrain_file, model, data, ppo,
                  is_preset=model.pretrain is None)


def count_prompts(job: PPOJob) -> int:
    """Read and check the prompt file here, before any actor starts (errors name file, line, field)."""
    from coati_ray.data.loading import load_rows, prompt_columns

    loaded = load_rows(job.prompt_file, prompt_columns(job.data.keys()), job.data.skip_bad_rows)
    return len(loaded.dataset)


def generator_placement(job: PPOJob, roles: RoleArgs, resources: dict | None) -> dict:
    """Ray options of one generator actor.

    Generators are spread over the nodes that may hold them. A vLLM engine with tensor-parallel size k > 1 gets its own placement group of k bundles
    (one GPU and the generator's CPUs each, packed onto one node when possible): the actor holds
    no GPU itself and vLLM's Ray executor starts its k workers in the group's bundles.
    """
    tp = job.ppo.vllm_tensor_parallel_size if job.ppo.generator_backend == "vllm" else 1
    if tp == 1:  # SPREAD: generators go to different nodes when they can (one node's failure costs less)
        return {"num_cpus": roles.generator_cpus, "num_gpus": roles.generator_gpus, "resources": resources,
                "scheduling_strategy": "SPREAD"}
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"GPU": 1.0, "CPU": roles.generator_cpus, **(resources or {})} for _ in range(tp)],
                         strategy="PACK")
    return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def start_roles(job: PPOJob, roles: RoleArgs, cluster: ClusterArgs, n_prompts: int) -> Roles:
    """Start every role's actors (each named `<role>-<i>`) where `--placement` puts them.

    Generators, references and rewards are restarted by Ray after a crash (`--max_restarts`);
    calls to a restarting reference or reward are retried by Ray, and a generator's chunk in
    flight is issued again by the buffer. Trainers are not restarted: their state dies with them.
    """
    import ray

    from coati_ray.cluster.control import JobControl
    from coati_ray.cluster.placement import role_resources
    from coati_ray.workers.buffer import ReplayBuffer, StepPlan
    from coati_ray.workers.generator import GeneratorWorker
    from coati_ray.workers.reference import ReferenceWorker
    from coati_ray.workers.reward import RewardWorker

    res, fam, dt, ppo = role_resources(roles, ray.cluster_resources()), job.model.model, job.model.dtype, job.ppo
    nccl = ppo.generator_backend == "vllm" and ppo.vllm_weight_sync == "nccl"
    restart = {"max_restarts": roles.max_restarts, "max_task_retries": -1}
    control = start_actor(JobControl, "control", (Path(ppo.save_path).name,), num_cpus=0, resources=res.get("control"))
    refs = [start_actor(ReferenceWorker, f"reference-{i}", (job.policy_path, fam, dt, int(roles.reference_cpus)),
                        roles.reference_cpus, roles.reference_gpus, res.get("reference"), **restart)
            for i in range(roles.ref_workers)]
    rewards = [start_actor(RewardWorker, f"reward-{i}", (job.reward_path, fam, dt, int(roles.reward_cpus)),
                           roles.reward_cpus, roles.reward_gpus, res.get("reward"), **restart)
               for i in range(roles.reward_workers)]

    def start_generator(i: int):
        # The buffer, not Ray, issues a dead generator's chunk again (to whichever generator is free).
        # A generator in an NCCL group cannot rejoin it after a restart: it fails the run instead.
        return start_actor(GeneratorWorker, f"generator-{i}", (i, job, refs, rewards, int(roles.generator_cpus)),
                           max_restarts=0 if nccl else roles.max_restarts, max_task_retries=0,
                           **generator_placement(job, roles, res.get("generator")))

    gens = {i: start_generator(i) for i in range(roles.actors)}
    # Wait until every generator is constructed: a failing constructor surfaces here, clearly.
    get_unwrapped([g.weight_version.remote() for g in gens.values()])
    plan = StepPlan(n_prompts, ppo.experience_batch_size, ppo.n_samples_per_prompt, ppo.seed)
    buffer = start_actor(ReplayBuffer, "buffer-0", (ppo.buffer_capacity(), plan, gens), num_cpus=0,
                         resources=res.get("buffer"), max_concurrency=ReplayBuffer.MAX_CONCURRENCY)
    policy = PolicyGroup(cluster.trainers, cluster.cpus_per_trainer or 1.0, cluster.gpus_per_trainer,
                         name_prefix="trainer", resources=res.get("trainer"))
    critic = CriticGroup(roles.critic_trainers, roles.critic_cpus, roles.critic_gpus, name_prefix="critic",
                         resources=res.get("critic")) if job.critic_path else None
    return Roles(buffer, control, refs, rewards, gens, policy, critic, start_generator)


def run_ppo(model: ModelArgs, data: DataArgs, ppo: PPOArgs, roles: RoleArgs, cluster: ClusterArgs,
            progress: bool = True) -> PPOResult:
    """Run stage 3 and save the policy to `ppo.save_path` (the critic to `save_path/critic`)."""
    validate_all(model, data, roles, cluster)
    ppo.validate(cluster.trainers)
    job = make_ppo_job(model, data, ppo, roles, cluster)
    n_prompts = count_prompts(job)
    cpus = (roles.actors * roles.generator_cpus + roles.ref_workers * roles.reference_cpus
            + roles.reward_workers * roles.reward_cpus + roles.critic_trainers * roles.critic_cpus
            + cluster.trainers * (cluster.cpus_per_trainer or 1.0))
    embedded = init_ray(cluster.address, num_cpus=int(cpus + 0.999), dashboard_host=cluster.dashboard_host)
    import ray

    total_cpus = ray.cluster_resources().get("CPU", 0)
    if embedded and total_cpus < cpus:  # the actors would wait for CPUs forever (a real cluster may autoscale)
        raise ConfigError("actors", f"the roles ask for {cpus:g} CPUs but the Ray cluster has {total_cpus:g}; lower "
                          "--actors / --*_cpus / --cpus_per_trainer or add nodes")
    actors = start_roles(job, roles, cluster, n_prompts)
    try:
        return _loop(job, actors, n_prompts, progress)
    finally:
        actors.shutdown()


def _ckpt_dir(save: Path, step: int) -> Path:
    return save / "checkpoints" / f"step_{step}"


def _save_checkpoint(actors: Roles, save: Path, step: int, kl_ctl) -> None:
    """policy/ + critic/ + ppo_state.json, written beside and renamed: a crash leaves the old one valid."""
    final = _ckpt_dir(save, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    actors.policy.save_checkpoint(str(tmp / "policy"), {"step": step})
    if actors.critic is not None:
        actors.critic.save_checkpoint(str(tmp / "critic"), {"step": step})
    (tmp / "ppo_state.json").write_text(json.dumps({"step": step, "kl": kl_ctl.state_dict()}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _resume(ppo: PPOArgs, actors: Roles, kl_ctl) -> int:
    """Load the checkpoint --resume names, if any; the step to start from."""
    from coati_ray.pipelines.supervised import resume_checkpoint

    if ppo.resume == "no":
        return 0
    ckpt = resume_checkpoint(ppo.resume, ppo.save_path, marker="ppo_state.json")
    if ckpt is None:
        logger.warning("--resume: no checkpoint under %s/checkpoints; starting from step 0", ppo.save_path)
        return 0
    state = json.loads((Path(ckpt) / "ppo_state.json").read_text())
    actors.policy.load_checkpoint(str(Path(ckpt) / "policy"))
    if actors.critic:
        actors.critic.load_checkpoint(str(Path(ckpt) / "critic"))
    kl_ctl.load_state_dict(state["kl"])
    logger.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"]


def _scale_generators(actors: Roles, target: int | None, nccl: bool) -> None:
    """Start or retire generators until `target` run (a request from `launchers/control.py`).

    New generators join the buffer's pool as soon as they are constructed (a pending one waits
    for a node: on an autoscaling cluster its demand makes the autoscaler add a rollout node).
    Retired ones finish the chunk they are making first, then are killed.
    """
    import ray

    have = len(actors.generators)
    if target is None or target == have:
        return
    if nccl:
        logger.warning("scaling to %d generators refused: --vllm_weight_sync nccl fixes the engines at start-up", target)
        return
    if target > have:
        first = max(actors.generators) + 1
        new = {i: actors.start_generator(i) for i in range(first, first + target - have)}
        actors.generators.update(new)
        get_unwrapped(actors.buffer.add_generators.remote(new))
        logger.info("scaling: starting generators %s (%d requested)", sorted(new), target)
    else:
        retire = sorted(actors.generators)[target - have:]
        gone = get_unwrapped(actors.buffer.retire_generators.remote(retire))
        for i in gone:
            ray.kill(actors.generators.pop(i))
        logger.info("scaling: retired generators %s (%d requested)", gone, target)


def _drop_lost_generators(actors: Roles, nccl: bool) -> None:
    """Forget the generators the buffer gave up on (restarts used up, or never started), so the
    weight sync, the sync check and the reported count use live ones only."""
    import ray

    for i in get_unwrapped(actors.buffer.lost_generators.remote()):
        handle = actors.generators.pop(i, None)
        if nccl:  # the NCCL group was built with every engine in it: a broadcast would wait forever
            raise RuntimeError(f"generator-{i} died and --vllm_weight_sync nccl cannot go on without it "
                               "(the NCCL group is fixed at start-up); continue with --resume auto")
        if handle is not None:
            ray.kill(handle)  # frees what it still holds if it hangs rather than died
        logger.warning("generator-%d is gone for good; %d generators left", i, len(actors.generators))


def _stop_if_trainer_died(actors: Roles, save: Path, step: int, error: BaseException) -> None:
    """Raise RunStopped when `error` came from a dead trainer or critic rank: the run cannot go on
    (its optimizer state died with it); the latest checkpoint is where --resume auto continues."""
    from coati_ray.errors import RunStopped
    from coati_ray.pipelines.supervised import latest_checkpoint

    dead = [f"{prefix}-{r}" for prefix, g in (("trainer", actors.policy), ("critic", actors.critic))
            if g is not None for r in g.dead_ranks()]
    if not dead:
        return
    ckpt = latest_checkpoint(str(save), marker="ppo_state.json")
    cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    raise RunStopped(f"{', '.join(dead)} died during step {step + 1} ({cause}); the run stopped. "
                     + (f"Continue from {ckpt} with --resume auto." if ckpt else
                        "No checkpoint was saved yet (see --ckpt_interval); --resume auto starts over."))


def _loop(job: PPOJob, actors: Roles, n_prompts: int, progress: bool) -> PPOResult:
    import ray
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from coati_ray.workers.generator import steps_per_episode

    ppo, k = job.ppo, job.ppo.max_staleness
    spe = steps_per_episode(n_prompts, ppo.experience_batch_size)
    if spe == 0:
        raise ConfigError("experience_batch_size", f"{ppo.experience_batch_size} prompts per step do not fit in "
                          f"{n_prompts} prompts ({job.prompt_file})")
    total = spe * ppo.num_episodes if ppo.max_steps is None else min(spe * ppo.num_episodes, ppo.max_steps)
    # Set up both trainer groups at once (each loads its model).
    futs = actors.policy._call_refs("setup_ppo", job)
    cfuts = actors.critic._call_refs("setup_critic", job) if actors.critic else []
    info = get_all(futs)[0]
    cinfo = get_all(cfuts)[0] if cfuts else None
    logger.info("ppo: %d prompts, %d steps (%d per episode), %d samples per step; policy %.2fM params "
                "(%.2fM trainable, lr %.1e)%s; %d generators, %d trainers, %s", n_prompts, total, spe,
                ppo.step_samples(), info["params"] / 1e6, info["trainable_params"] / 1e6, info["lr"],
                f", critic lr {cinfo['lr']:.1e}" if cinfo else "", len(actors.generators), actors.policy.n,
                "on-policy" if k == 0 else f"async (max_staleness {k})")
    save = Path(ppo.save_path)
    save.mkdir(parents=True, exist_ok=True)
    kl_ctl = make_kl_controller(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    result = PPOResult(ppo.save_path, total, placement=actors.placement())
    result.start_step = _resume(ppo, actors, kl_ctl)
    version = result.start_step  # weights version = PPO steps applied
    get_unwrapped(actors.buffer.start_at.remote(result.start_step))
    # Generators start from the initial policy; after a resume they load the checkpoint's weights.
    nccl = ppo.generator_backend == "vllm" and ppo.vllm_weight_sync == "nccl"
    if nccl:  # weights are pushed into the engines; `weights` stays [None]
        actors.policy.nccl_connect(list(actors.generators.values()),
                                   [ppo.vllm_tensor_parallel_size] * len(actors.generators))
        if version > 0:
            actors.policy.nccl_push(version, list(actors.generators.values()))
    weights = [actors.policy.publish(version)] if version > 0 and not nccl else [None]
    writer = SummaryWriter(str(save / "tensorboard"))
    bar = tqdm(total=total, initial=result.start_step, desc="ppo", disable=not progress, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    producing: list = []  # buffer.produce futures (they fail when a rollout fails)
    next_d, step = result.start_step, result.start_step
    actors.control.report.remote({"step": step, "total": total, "generators": len(actors.generators),
                                  "state": "running"}, {})
    try:
        while step < total:
            t_step = time.perf_counter()
            target, stop = get_unwrapped(actors.control.poll.remote())
            if stop:
                logger.warning("stop requested (launchers/control.py --stop) at step %d of %d", step, total)
                break
            _scale_generators(actors, target, nccl)
            _drop_lost_generators(actors, nccl)
            # 1. ask for every data step the staleness bound allows; the buffer dispatches the
            #    rollouts as room frees up, and generators older than `version` load `weights` first
            while next_d < total and next_d <= version + k:
                producing.append(actors.buffer.produce.remote(next_d, version, weights, kl_ctl.value))
                next_d += 1
            # 2. take the step's experience: references and small metadata only
            taken = get_unwrapped(actors.buffer.take.remote(step, ppo.step_samples(), step - k))
            done, producing = ray.wait(producing, num_returns=len(producing), timeout=0)
            get_unwrapped(done)
            t_exp = time.perf_counter()
            refs = [r for r, _ in taken]
            # 3. values and advantages
            exp_refs = [actors.critic.prepare(refs, step, kl_ctl.value)] if actors.critic else refs
            t_values = time.perf_counter()
            # 4. update policy and critic at once
            pf = actors.policy.start_train(exp_refs, step)
            cf = actors.critic.start_train(step) if actors.critic else None
            pm, ids, versions = PolicyGroup.finish_train(pf)
            cm = get_all(cf)[0] if cf else {}
            t_train = time.perf_counter()
            # 5. weight sync: published once; each generator reads it from the object store before
            #    its next rollout (the load time is reported with that rollout). With
            #    --vllm_weight_sync nccl, trainer rank 0 broadcasts into every engine instead.
            if nccl:  # every engine holds `step + 1` when this returns
                actors.policy.nccl_push(step + 1, list(actors.generators.values()))
            else:
                weights = [actors.policy.publish(step + 1)]
            version = step + 1
            t_sync = time.perf_counter()
            step += 1
            check = {}
            if ppo.sync_check_interval and (step == 1 or step % ppo.sync_check_interval == 0):
                check = _sync_check(actors, weights, refs[0], version)
            # 6. bookkeeping
            made = sorted(i for _, m in taken for i in m.sample_ids)
            for e, got in enumerate(ids):
                if got != made:  # every sample exactly once per epoch; a bug if not
                    raise RuntimeError(f"step {step}: epoch {e} trained {len(got)} samples, expected the {len(made)} made")
            m = _step_metrics(taken, versions, step - 1, pm, cm, kl_ctl.value)
            m.update({"timing/experience": t_exp - t_step, "timing/values": t_values - t_exp,
                      "timing/train": t_train - t_values, "timing/sync": t_sync - t_train,
                      "timing/step": time.perf_counter() - t_step,
                      "perf/samples_per_s": len(made) / (time.perf_counter() - t_step), "train/step": step})
            m.update(get_unwrapped(actors.buffer.stats.remote()))
            m.update(check)
            kl_ctl.update(m["kl/mean"], len(made))
            result.history.append(m)
            result.trained_ids.append(ids)
            result.made_ids.append(made)
            result.trained_versions.append(versions)
            result.made_by.append([meta.generator for _, meta in taken])
            actors.control.report.remote({"step": step, "total": total, "generators": len(actors.generators),
                                          "pooled": m["generators/pooled"]}, m)
            for key, v in m.items():
                writer.add_scalar(key, v, step)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", refresh=False)
            if step % ppo.log_interval == 0 or step == total:
                bar.write(_metrics_line(step, total, m))
            if ppo.ckpt_interval and step % ppo.ckpt_interval == 0 and step < total:
                _save_checkpoint(actors, save, step, kl_ctl)
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d; saving a checkpoint so --resume can continue", step)
        _save_checkpoint(actors, save, step, kl_ctl)
        raise
    except Exception as e:  # a dead trainer rank: one clear message, pointing at the checkpoint to resume
        _stop_if_trainer_died(actors, save, step, e)
        raise
    finally:
        bar.close()
    _save_checkpoint(actors, save, step, kl_ctl)
    actors.policy.save_model(ppo.save_path, job.model.merge_lora)
    if actors.critic:
        actors.critic.save_model(str(save / "critic"), job.model.merge_lora)
    writer.close()
    get_unwrapped(actors.control.report.remote({"step": step, "state": "finished"}, {}))
    (save / "ppo_summary.json").write_text(json.dumps({
        "steps": step, "start_step": result.start_step, "policy_init": job.policy_path, "reward_model": job.reward_path,
        "first": result.history[0] if result.history else None, "last": result.history[-1] if result.history else None,
        "ppo_args": asdict(ppo)}, indent=1))
    logger.info("saved the PPO policy to %s", ppo.save_path)
    return result


def _sync_check(actors: Roles, weights: list, exp_ref, version: int) -> dict[str, float]:
    """Generator-0 and the trainer score the same sequences with weights `version`; they must agree.

    Catches a weight sync that silently failed (wrong names, dtype, a stale copy): the max
    log-prob difference is float noise (~1e-6) when the sync worked.
    """
    first = actors.generators[min(actors.generators)]
    g_version, g_lp = get_restartable(lambda: first.sync_check.remote(weights, exp_ref))
    t_lp = actors.policy.score_log_probs(exp_ref)
    if g_version != version:
        raise RuntimeError(f"weight sync: generator-{min(actors.generators)} holds v{g_version} after loading v{version}")
    return {"sync/logprob_max_diff": float((g_lp - t_lp).abs().max())}


def _step_metrics(taken, versions: list[int], step: int, pm: dict, cm: dict, kl_coef: float) -> dict[str, float]:
    n = sum(m.n for _, m in taken)
    tot = {k: sum(m.stats[k] for _, m in taken) for k in taken[0][1].stats}
    mean = tot["score_sum"] / n
    staleness = [step - v for v in versions]
    gen_s: dict[int, float] = {}  # generator -> its seconds generating this step's chunks
    for _, m in taken:
        gen_s[m.generator] = gen_s.get(m.generator, 0.0) + m.stats["generate_s"]
    return {**pm, **cm,
            "reward/mean": mean, "reward/std": max(tot["score_sq"] / n - mean * mean, 0.0) ** 0.5,
            "kl/mean": tot["kl_sum"] / n, "kl/coef": kl_coef,
            "response/length": tot["length_sum"] / n, "response/finished": tot["finished"] / n,
            "buffer/staleness_mean": sum(staleness) / len(staleness), "buffer/staleness_max": max(staleness),
            # generators run in parallel: a phase takes as long as its slowest generator
            "timing/generate": max(m.stats["generate_s"] for _, m in taken),
            "timing/score": max(m.stats["score_s"] for _, m in taken),
            "timing/sync_load": max(m.stats["load_s"] for _, m in taken),
            # all generators together: the step's tokens over the busiest generator's generation time
            "rollout/tokens_per_s": tot["tokens"] / max(max(gen_s.values()), 1e-9), "generators/active": len(gen_s)}


def _metrics_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}", f"reward {m['reward/mean']:.3f}±{m['reward/std']:.3f}", f"kl {m['kl/mean']:.4f}",
             f"pg {m['policy/loss']:.4f}", f"clip {m['policy/clipfrac']:.3f}", f"len {m['response/length']:.1f}"]
    if "value/loss" in m:
        parts += [f"vloss {m['value/loss']:.4f}", f"ev {m['value/explained_variance']:.2f}"]
    if "ptx/loss" in m:
        parts.append(f"ptx {m['ptx/loss']:.3f}")
    parts.append(f"stale {m['buffer/staleness_mean']:.1f}")
    parts.append("t gen/score/train/sync {:.1f}/{:.1f}/{:.1f}/{:.2f}s".format(
        m["timing/generate"], m["timing/score"] + m["timing/values"], m["timing/train"], m["timing/sync"]))
    return " | ".join(parts)
