"""The stage-3 driver: PPO (+PTX) with every role a Ray actor. The driver holds no experience data.

`ppo_step` is one step, top to bottom (policy weights v = s; on-policy unless --max_staleness k > 0):
    1. produce: the buffer has every generator make its share of step d's experience, d <= v + k
    2. take step s's chunks from the replay buffer (ObjectRefs only)
    3. critic: values -> GAE advantages and returns (gae only; grpo/rloo did theirs in the generator)
    4. update: policy (PPO + PTX) and critic (value loss) at once, max_epochs over the step's samples
    5. sync: the weight-sync transport publishes weights v + 1 (coati_ray/sync/); each generator
       holds them before its next rollout
    6. metrics, KL controller
Set-up (`ppo_roles.py`), resuming, checkpoints and the final save (`ppo_state.py`) live beside it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coati_ray.cluster.ray_env import init_ray
from coati_ray.errors import ConfigError
from coati_ray.pipelines import ppo_state
from coati_ray.pipelines.ppo_roles import (
    PPOJobs,
    Roles,
    check_plan_fits,
    count_prompts,
    drop_lost_generators,
    make_jobs,
    scale_generators,
    start_roles,
)
from coati_ray.ppo_config import PARTS, PPOConfig
from coati_ray.run_dir import check_resume_config, start_run
from coati_ray.runtime import get_all, get_unwrapped
from coati_ray.sync.base import WeightTicket
from coati_ray.tracking import Trackers, parse_report_to

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
    run_id: str = ""  # the id in save_path/run.json that this run's checkpoints carry
    # seconds since run_ppo began at which start-up reached each point ("ray_up", "actors_started",
    # "models_loaded", "first_step", "last_step", "saved"): where a short run's time goes
    timeline: dict[str, float] = field(default_factory=dict)


@dataclass
class StepState:
    """What one step hands the next."""

    total: int  # steps in the run
    ticket: WeightTicket  # the newest weights, as rollouts fetch them
    kl_ctl: Any  # KL coefficient controller (fixed or adaptive)
    next_d: int  # the next data step to ask the buffer for
    producing: list = field(default_factory=list)  # buffer.produce futures (they fail when a rollout fails)
    updating: bool = False  # the trainers started this step's update: their state is no step's whole state


@dataclass
class StepOut:
    metrics: dict[str, float]
    trained_ids: list[list[int]]  # per epoch, the sample ids trained (all ranks)
    versions: list[int]  # weight version of every sample
    taken: list  # (ObjectRef, ChunkMeta) of the step's chunks


def ppo_step(step: int, cfg: PPOConfig, actors: Roles, st: StepState) -> StepOut:
    """Run PPO step `step` (0-based)."""
    import ray

    k, t0 = cfg.run.max_staleness, time.perf_counter()
    # 1. ask for every data step the staleness bound allows; the buffer dispatches the rollouts as
    #    room frees up, and a generator older than the ticket's version brings itself up to date first
    while st.next_d < st.total and st.next_d <= st.ticket.version + k:
        st.producing.append(actors.buffer.produce.remote(st.next_d, st.ticket.version, st.ticket, st.kl_ctl.value))
        st.next_d += 1
    # 2. take the step's experience: references and small metadata only
    taken = get_all([actors.buffer.take.remote(step, cfg.step_samples(), step - k)], [f"buffer-0.take(step {step})"])[0]
    done, st.producing = ray.wait(st.producing, num_returns=len(st.producing), timeout=0)
    get_unwrapped(done)
    refs, t_exp = [r for r, _ in taken], time.perf_counter()
    # 3. values and advantages
    exp_refs = [actors.critic.prepare(refs, step, st.kl_ctl.value)] if actors.critic else refs
    t_values = time.perf_counter()
    # 4. update policy and critic at once
    st.updating = True
    pf = actors.policy.start_train(exp_refs, step)
    cf = actors.critic.start_train(step) if actors.critic else None
    pm, ids, versions = actors.policy.finish_train(pf)
    cm = actors.critic.finish_train(cf) if cf else {}
    t_train = time.perf_counter()
    # 5. weight sync: every generator holds (or fetches before its next rollout) weights step + 1
    st.ticket = actors.sync.publish(step + 1)
    t_sync = time.perf_counter()
    interval = cfg.run.sync_check_interval
    check = ppo_state.sync_check(actors, st.ticket, refs[0], step + 1) \
        if interval and (step == 0 or (step + 1) % interval == 0) else {}
    # 6. metrics; every sample exactly once per epoch (a bug if not)
    made = sorted(i for _, m in taken for i in m.sample_ids)
    for e, got in enumerate(ids):
        if got != made:
            raise RuntimeError(f"step {step + 1}: epoch {e} trained {len(got)} samples, expected the {len(made)} made")
    m = ppo_state.step_metrics(taken, versions, step, pm, cm, st.kl_ctl.value)
    m.update({"timing/experience": t_exp - t0, "timing/values": t_values - t_exp, "timing/train": t_train - t_values,
              "timing/sync": t_sync - t_train, "timing/step": time.perf_counter() - t0,
              "perf/samples_per_s": len(made) / (time.perf_counter() - t0), "train/step": step + 1})
    m.update(get_unwrapped(actors.buffer.stats.remote()))
    m.update(check)
    st.kl_ctl.update(m["kl/mean"], len(made))
    return StepOut(m, ids, versions, taken)


def run_config(cfg: PPOConfig) -> dict[str, dict[str, Any]]:
    """The run's flags by part: run.json's `config` and save_path/config.yaml."""
    return {part: asdict(getattr(cfg, part)) for part in PARTS}


def run_ppo(cfg: PPOConfig, progress: bool = True) -> PPOResult:
    """Run stage 3 and save the policy to `--save_path` (the critic to `save_path/critic`)."""
    t0 = time.perf_counter()
    cfg.validate()
    check_resume_config(cfg.run.save_path, cfg.run.resume, run_config(cfg))
    check_plan_fits(cfg)
    jobs = make_jobs(cfg)
    n_prompts = count_prompts(jobs)
    cpus = cfg.roles.cpus() + cfg.cluster.trainers * (cfg.cluster.cpus_per_trainer or 1.0)
    embedded = init_ray(cfg.cluster.address, num_cpus=int(cpus + 0.999), dashboard_host=cfg.cluster.dashboard_host,
                        dashboard=cfg.cluster.dashboard)
    import ray

    total_cpus = ray.cluster_resources().get("CPU", 0)
    if embedded and total_cpus < cpus:  # the actors would wait for CPUs forever (a real cluster may autoscale)
        raise ConfigError("actors", f"the roles ask for {cpus:g} CPUs but the Ray cluster has {total_cpus:g}; lower "
                          "--actors / --*_cpus / --cpus_per_trainer or add nodes")
    timeline = {"ray_up": time.perf_counter() - t0}
    actors = start_roles(cfg, jobs, n_prompts)
    timeline["actors_started"] = time.perf_counter() - t0
    try:
        return _run(cfg, jobs, actors, n_prompts, progress, timeline, t0)
    finally:
        actors.shutdown()


def _set_up(cfg: PPOConfig, jobs: PPOJobs, actors: Roles, n_prompts: int) -> tuple[PPOResult, StepState]:
    """Both trainer groups load their models at once; resume; connect the weight sync."""
    from coati_ray.algos.kl_control import make_kl_controller
    from coati_ray.workers.chunks import steps_per_episode

    run, ro = cfg.run, cfg.rollout
    spe = steps_per_episode(n_prompts, ro.experience_batch_size)
    if spe == 0:
        raise ConfigError("experience_batch_size", f"{ro.experience_batch_size} prompts per step do not fit in "
                          f"{n_prompts} prompts ({jobs.prompt_file})")
    total = spe * run.num_episodes if run.max_steps is None else min(spe * run.num_episodes, run.max_steps)
    futs = actors.policy.start_setup(jobs.policy)
    cfuts = actors.critic.start_setup(jobs.critic) if actors.critic else []
    info = get_all(futs, actors.policy.labels("setup"))[0]
    cinfo = get_all(cfuts, actors.critic.labels("setup"))[0] if cfuts else None
    logger.info("ppo: %d prompts, %d steps (%d per episode), %d samples per step; policy %.2fM params "
                "(%.2fM trainable, lr %.1e: %s)%s; %d generators, %d trainers, %s", n_prompts, total, spe,
                cfg.step_samples(), info["params"] / 1e6, info["trainable_params"] / 1e6, info["lr"], info["lr_why"],
                f", critic lr {cinfo['lr']:.1e} ({cinfo['lr_why']})" if cinfo else "", len(actors.generators),
                actors.policy.n,
                "on-policy" if run.max_staleness == 0 else f"async (max_staleness {run.max_staleness})")
    run_id = start_run(run.save_path, "ppo", run.resume, run.overwrite, run_config(cfg))
    kl_ctl = make_kl_controller(cfg.objective.kl_coef, cfg.objective.kl_target, cfg.objective.kl_horizon)
    result = PPOResult(run.save_path, total, placement=actors.placement(), run_id=run_id)
    result.start_step = ppo_state.resume(cfg, actors, kl_ctl)
    get_unwrapped(actors.buffer.start_at.remote(result.start_step))
    # Generators start from the initial policy; after a resume they get the checkpoint's weights.
    ticket = actors.sync.connect(dict(actors.generators), result.start_step)
    return result, StepState(total, ticket, kl_ctl, result.start_step)


def _run(cfg: PPOConfig, jobs: PPOJobs, actors: Roles, n_prompts: int, progress: bool,
         timeline: dict[str, float], t0: float) -> PPOResult:
    from tqdm import tqdm

    result, st = _set_up(cfg, jobs, actors, n_prompts)
    result.timeline = timeline
    timeline["models_loaded"] = time.perf_counter() - t0
    save, step, total = Path(cfg.run.save_path), result.start_step, st.total
    keep = (result.run_id, cfg.run.keep_checkpoints)  # what every checkpoint records and how many stay
    writer = Trackers(parse_report_to(cfg.run.report_to), cfg.run.save_path, "ppo", result.run_id, run_config(cfg))
    bar = tqdm(total=total, initial=step, desc="ppo", disable=not progress, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    actors.control.report.remote({"step": step, "total": total, "generators": len(actors.generators),
                                  "state": "running"}, {})
    try:
        while step < total:
            target, stop = get_unwrapped(actors.control.poll.remote())
            if stop:
                logger.warning("stop requested (launchers/control.py --stop) at step %d of %d", step, total)
                break
            scale_generators(actors, target)
            drop_lost_generators(actors)
            out = ppo_step(step, cfg, actors, st)
            timeline["first_step" if step == result.start_step else "last_step"] = time.perf_counter() - t0
            step, m, st.updating = step + 1, out.metrics, False
            result.history.append(m)
            result.trained_ids.append(out.trained_ids)
            result.made_ids.append(sorted(i for _, c in out.taken for i in c.sample_ids))
            result.trained_versions.append(out.versions)
            result.made_by.append([c.generator for _, c in out.taken])
            actors.control.report.remote({"step": step, "total": total, "generators": len(actors.generators),
                                          "pooled": m["generators/pooled"]}, m)
            writer.scalars(m, step)
            if cfg.run.log_samples_interval and (step % cfg.run.log_samples_interval == 0 or step == total):
                writer.samples([s for _, c in out.taken for s in c.samples], step)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", refresh=False)
            if step % cfg.run.log_interval == 0 or step == total:
                bar.write(ppo_state.metrics_line(step, total, m))
            if cfg.run.ckpt_interval and step % cfg.run.ckpt_interval == 0 and step < total:
                ppo_state.save_checkpoint(actors, save, step, st.kl_ctl, *keep)
    except KeyboardInterrupt:
        ppo_state.save_on_interrupt(actors, save, step, st.kl_ctl, st.updating, *keep)
        raise
    except Exception as e:  # a dead trainer rank: one clear message, pointing at the checkpoint to resume
        ppo_state.stop_if_trainer_died(actors, save, step, e)
        raise
    finally:
        bar.close()
        writer.close()
    ppo_state.save_final(cfg, jobs, actors, result, step, st.kl_ctl)
    timeline["saved"] = time.perf_counter() - t0
    return result
