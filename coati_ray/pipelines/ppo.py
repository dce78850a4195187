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
from coati_ray.cluster.group import get_unwrapped, start_actor
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
from coati_ray.pipelines.supervised import latest_checkpoint
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


@dataclass
class Roles:
    buffer: Any
    references: list
    rewards: list
    generators: list
    policy: PolicyGroup
    critic: CriticGroup | None

    def shutdown(self) -> None:
        import ray

        for g in (self.policy, self.critic):
            if g is not None:
                g.shutdown()
        for a in [self.buffer, *self.references, *self.rewards, *self.generators]:
            ray.kill(a)


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
                  num_generators=roles.actors, is_preset=model.pretrain is None)


def count_prompts(job: PPOJob) -> int:
    """Read and check the prompt file here, before any actor starts (errors name file, line, field)."""
    from coati_ray.data.loading import load_rows, prompt_columns

    loaded = load_rows(job.prompt_file, prompt_columns(job.data.keys()), job.data.skip_bad_rows)
    return len(loaded.dataset)


def generator_placement(job: PPOJob, roles: RoleArgs, resources: dict | None) -> dict:
    """Ray options of one generator actor.

    A vLLM engine with tensor-parallel size k > 1 gets its own placement group of k bundles
    (one GPU and the generator's CPUs each, packed onto one node when possible): the actor holds
    no GPU itself and vLLM's Ray executor starts its k workers in the group's bundles.
    """
    tp = job.ppo.vllm_tensor_parallel_size if job.ppo.generator_backend == "vllm" else 1
    if tp == 1:
        return {"num_cpus": roles.generator_cpus, "num_gpus": roles.generator_gpus, "resources": resources}
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"GPU": 1.0, "CPU": roles.generator_cpus, **(resources or {})} for _ in range(tp)],
                         strategy="PACK")
    return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def start_roles(job: PPOJob, roles: RoleArgs, cluster: ClusterArgs) -> Roles:
    from coati_ray.workers.buffer import ReplayBuffer
    from coati_ray.workers.generator import GeneratorWorker, prompts_per_step
    from coati_ray.workers.reference import ReferenceWorker
    from coati_ray.workers.reward import RewardWorker

    res, fam, dt = roles.resources(), job.model.model, job.model.dtype
    refs = [start_actor(ReferenceWorker, f"reference-{i}", (job.policy_path, fam, dt, int(roles.reference_cpus)),
                        roles.reference_cpus, roles.reference_gpus, res.get("reference"))
            for i in range(roles.ref_workers)]
    rewards = [start_actor(RewardWorker, f"reward-{i}", (job.reward_path, fam, dt, int(roles.reward_cpus)),
                           roles.reward_cpus, roles.reward_gpus, res.get("reward")) for i in range(roles.reward_workers)]
    gens = [start_actor(GeneratorWorker, f"generator-{i}", (i, job, refs, rewards, int(roles.generator_cpus)),
                        **generator_placement(job, roles, res.get("generator"))) for i in range(roles.actors)]
    # Wait until every generator is constructed: a failing constructor surfaces here, clearly.
    get_unwrapped([g.weight_version.remote() for g in gens])
    per_gen = [prompts_per_step(job.ppo.experience_batch_size, i, roles.actors) * job.ppo.n_samples_per_prompt
               for i in range(roles.actors)]
    buffer = start_actor(ReplayBuffer, "buffer-0", (job.ppo.buffer_capacity(), gens, per_gen), num_cpus=0,
                         resources=res.get("buffer"), max_concurrency=ReplayBuffer.MAX_CONCURRENCY)
    policy = PolicyGroup(cluster.trainers, cluster.cpus_per_trainer or 1.0, cluster.gpus_per_trainer,
                         name_prefix="trainer", resources=res.get("trainer"))
    critic = CriticGroup(roles.critic_trainers, roles.critic_cpus, roles.critic_gpus, name_prefix="critic",
                         resources=res.get("critic")) if job.critic_path else None
    return Roles(buffer, refs, rewards, gens, policy, critic)


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
    init_ray(cluster.address, num_cpus=int(cpus + 0.999))
    import ray

    total_cpus = ray.cluster_resources().get("CPU", 0)
    if total_cpus < cpus:  # the actors would wait for CPUs forever
        raise ConfigError("actors", f"the roles ask for {cpus:g} CPUs but the Ray cluster has {total_cpus:g}; lower "
                          "--actors / --*_cpus / --cpus_per_trainer or add nodes")
    actors = start_roles(job, roles, cluster)
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


def _loop(job: PPOJob, actors: Roles, n_prompts: int, progress: bool) -> PPOResult:
    import ray
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from coati_ray.workers.generator import steps_per_episode

    ppo, k = job.ppo, job.ppo.max_staleness
    spe = steps_per_episode(n_prompts, ppo.experience_batch_size, job.num_generators) if n_prompts else 0
    if spe == 0:
        raise ConfigError("experience_batch_size", f"{ppo.experience_batch_size} prompts per step over "
                          f"{job.num_generators} generators do not fit in {n_prompts} prompts ({job.prompt_file})")
    total = spe * ppo.num_episodes if ppo.max_steps is None else min(spe * ppo.num_episodes, ppo.max_steps)
    # Set up both trainer groups at once (each loads its model).
    futs = actors.policy._call_refs("setup_ppo", job)
    cfuts = actors.critic._call_refs("setup_critic", job) if actors.critic else []
    info = get_unwrapped(futs)[0]
    cinfo = get_unwrapped(cfuts)[0] if cfuts else None
    logger.info("ppo: %d prompts, %d steps (%d per episode), %d samples per step; policy %.2fM params "
                "(%.2fM trainable, lr %.1e)%s; %d generators, %d trainers, %s", n_prompts, total, spe,
                ppo.step_samples(), info["params"] / 1e6, info["trainable_params"] / 1e6, info["lr"],
                f", critic lr {cinfo['lr']:.1e}" if cinfo else "", job.num_generators, actors.policy.n,
                "on-policy" if k == 0 else f"async (max_staleness {k})")
    save = Path(ppo.save_path)
    save.mkdir(parents=True, exist_ok=True)
    kl_ctl = make_kl_controller(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    result = PPOResult(ppo.save_path, total)
    if ppo.resume:
        ckpt = latest_checkpoint(ppo.save_path, marker="ppo_state.json")
        if ckpt is None:
            logger.warning("--resume: no checkpoint under %s/checkpoints; starting from step 0", ppo.save_path)
        else:
            state = json.loads((Path(ckpt) / "ppo_state.json").read_text())
            actors.policy.load_checkpoint(str(Path(ckpt) / "policy"))
            if actors.critic:
                actors.critic.load_checkpoint(str(Path(ckpt) / "critic"))
            kl_ctl.load_state_dict(state["kl"])
            result.start_step = state["step"]
            logger.info("resumed from %s at step %d", ckpt, result.start_step)
    version = result.start_step  # weights version = PPO steps applied
    get_unwrapped(actors.buffer.start_at.remote(result.start_step))
    # Generators start from the initial policy; after a resume they load the checkpoint's weights.
    nccl = ppo.generator_backend == "vllm" and ppo.vllm_weight_sync == "nccl"
    if nccl:  # weights are pushed into the engines; `weights` stays [None]
        actors.policy.nccl_connect(actors.generators, [ppo.vllm_tensor_parallel_size] * len(actors.generators))
        if version > 0:
            actors.policy.nccl_push(version, actors.generators)
    weights = [actors.policy.publish(version)] if version > 0 and not nccl else [None]
    writer = SummaryWriter(str(save / "tensorboard"))
    bar = tqdm(total=total, initial=result.start_step, desc="ppo", disable=not progress, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    producing: list = []  # buffer.produce futures (they fail when a rollout fails)
    next_d, step = result.start_step, result.start_step
    try:
        while step < total:
            t_step = time.perf_counter()
            # 1. ask for every data step the staleness bound allows; the buffer dispatches the
            #    rollouts as room frees up, and generators older than `version` load `weights` first
            while next_d < total and next_d <= version + k:
                producing.append(actors.buffer.produce.remote(next_d, version, weights, kl_ctl.value, spe))
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
            cm = get_unwrapped(cf)[0] if cf else {}
            t_train = time.perf_counter()
            # 5. weight sync: published once; each generator reads it from the object store before
            #    its next rollout (the load time is reported with that rollout). With
            #    --vllm_weight_sync nccl, trainer rank 0 broadcasts into every engine instead.
            version = step + 1
            if nccl:  # every engine holds `version` when this returns
                actors.policy.nccl_push(version, actors.generators)
            else:
                weights = [actors.policy.publish(version)]
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
    finally:
        bar.close()
    _save_checkpoint(actors, save, step, kl_ctl)
    actors.policy.save_model(ppo.save_path, job.model.merge_lora)
    if actors.critic:
        actors.critic.save_model(str(save / "critic"), job.model.merge_lora)
    writer.close()
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
    g_version, g_lp = get_unwrapped(actors.generators[0].sync_check.remote(weights, exp_ref))
    t_lp = actors.policy.score_log_probs(exp_ref)
    if g_version != version:
        raise RuntimeError(f"weight sync: generator-0 holds v{g_version} after loading v{version}")
    return {"sync/logprob_max_diff": float((g_lp - t_lp).abs().max())}


def _step_metrics(taken, versions: list[int], step: int, pm: dict, cm: dict, kl_coef: float) -> dict[str, float]:
    n = sum(m.n for _, m in taken)
    tot = {k: sum(m.stats[k] for _, m in taken) for k in taken[0][1].stats}
    mean = tot["score_sum"] / n
    staleness = [step - v for v in versions]
    return {**pm, **cm,
            "reward/mean": mean, "reward/std": max(tot["score_sq"] / n - mean * mean, 0.0) ** 0.5,
            "kl/mean": tot["kl_sum"] / n, "kl/coef": kl_coef,
            "response/length": tot["length_sum"] / n, "response/finished": tot["finished"] / n,
            "buffer/staleness_mean": sum(staleness) / len(staleness), "buffer/staleness_max": max(staleness),
            # generators run in parallel: a phase takes as long as its slowest generator
            "timing/generate": max(m.stats["generate_s"] for _, m in taken),
            "timing/score": max(m.stats["score_s"] for _, m in taken),
            "timing/sync_load": max(m.stats["load_s"] for _, m in taken)}


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
