"""Stage 3 bookkeeping around the step: checkpoints, resuming, the final save, a dead trainer's
message, the weight-sync check, and the step's metrics and console line."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from coati_ray.pipelines.ppo_roles import PPOJobs, Roles
from coati_ray.ppo_config import PPOConfig
from coati_ray.runtime import get_restartable, get_unwrapped

logger = logging.getLogger(__name__)


def ckpt_dir(save: Path, step: int) -> Path:
    return save / "checkpoints" / f"step_{step}"


def save_checkpoint(actors: Roles, save: Path, step: int, kl_ctl, run_id: str, keep: int) -> None:
    """policy/ + critic/ + ppo_state.json (last, naming the run), written beside and renamed: a crash
    leaves the old one valid. Then only the newest `keep` checkpoints stay (0: all)."""
    from coati_ray.run_dir import prune_checkpoints

    final = ckpt_dir(save, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    actors.policy.save_checkpoint(str(tmp / "policy"), {"step": step, "run_id": run_id})
    if actors.critic is not None:
        actors.critic.save_checkpoint(str(tmp / "critic"), {"step": step, "run_id": run_id})
    (tmp / "ppo_state.json").write_text(json.dumps({"step": step, "kl": kl_ctl.state_dict(), "run_id": run_id}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    prune_checkpoints(str(save), keep, "ppo_state.json")


def save_on_interrupt(actors: Roles, save: Path, step: int, kl_ctl, updating: bool, run_id: str, keep: int) -> None:
    """Ctrl-C: a checkpoint at `step` only when the trainers hold exactly `step` updates. Once step
    `step + 1`'s update has started they may hold part of it (or all of it, before the KL controller
    saw it): a checkpoint labelled `step` would then apply that update twice on --resume."""
    from coati_ray.run_dir import latest_checkpoint

    if not updating:
        logger.warning("interrupted at step %d; saving a checkpoint so --resume can continue", step)
        save_checkpoint(actors, save, step, kl_ctl, run_id, keep)
        return
    last = latest_checkpoint(str(save), marker="ppo_state.json")
    logger.warning("interrupted during step %d's update: no checkpoint written (the trainers may hold part of "
                   "that step); --resume auto continues from %s", step + 1, last or "the start (no checkpoint yet)")


def resume(cfg: PPOConfig, actors: Roles, kl_ctl) -> int:
    """Load the checkpoint --resume names, if any; the step to start from."""
    from coati_ray.run_dir import resume_checkpoint

    run = cfg.run
    if run.resume == "no":
        return 0
    ckpt = resume_checkpoint(run.resume, run.save_path, marker="ppo_state.json")
    if ckpt is None:
        logger.warning("--resume: no checkpoint under %s/checkpoints; starting from step 0", run.save_path)
        return 0
    state = json.loads((Path(ckpt) / "ppo_state.json").read_text())
    actors.policy.load_checkpoint(str(Path(ckpt) / "policy"))
    if actors.critic:
        actors.critic.load_checkpoint(str(Path(ckpt) / "critic"))
    kl_ctl.load_state_dict(state["kl"])
    logger.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"]


def save_final(cfg: PPOConfig, jobs: PPOJobs, actors: Roles, result, step: int, kl_ctl) -> None:
    """The last checkpoint, the policy (and critic) as HF directories, and ppo_summary.json."""
    save, history = Path(cfg.run.save_path), result.history
    save_checkpoint(actors, save, step, kl_ctl, result.run_id, cfg.run.keep_checkpoints)
    actors.policy.save_model(cfg.run.save_path, cfg.model.merge_lora)
    if actors.critic:
        actors.critic.save_model(str(save / "critic"), cfg.model.merge_lora)
    get_unwrapped(actors.control.report.remote({"step": step, "state": "finished"}, {}))
    (save / "ppo_summary.json").write_text(json.dumps({
        "steps": step, "start_step": result.start_step, "run_id": result.run_id, "policy_init": jobs.policy_path,
        "reward_model": jobs.reward_path,
        "reward_sources": [{"name": r.name, "kind": r.kind, "target": r.target, "weight": r.weight}
                           for r in jobs.reward_specs],
        "first": history[0] if history else None, "last": history[-1] if history else None,
        "ppo_args": {**asdict(cfg.run), **asdict(cfg.rollout), **asdict(cfg.objective)}}, indent=1))
    logger.info("saved the PPO policy to %s", cfg.run.save_path)


def stop_if_trainer_died(actors: Roles, save: Path, step: int, error: BaseException) -> None:
    """Raise RunStopped when `error` came from a dead trainer or critic rank: the run cannot go on
    (its optimizer state died with it); the latest checkpoint is where --resume auto continues."""
    from coati_ray.errors import RunStopped
    from coati_ray.run_dir import latest_checkpoint

    dead = [f"{prefix}-{r}" for prefix, g in (("trainer", actors.policy), ("critic", actors.critic))
            if g is not None for r in g.dead_ranks()]
    if not dead:
        return
    ckpt = latest_checkpoint(str(save), marker="ppo_state.json")
    cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    raise RunStopped(f"{', '.join(dead)} died during step {step + 1} ({cause}); the run stopped. "
                     + (f"Continue from {ckpt} with --resume auto." if ckpt else
                        "No checkpoint was saved yet (see --ckpt_interval); --resume auto starts over."))


def sync_check(actors: Roles, ticket, exp_ref, version: int) -> dict[str, float]:
    """Generator-0 and the trainer score the same sequences with weights `version`; they must agree.

    Catches a weight sync that silently failed (wrong names, dtype, a stale copy): the max
    log-prob difference is float noise (~1e-6) when the sync worked.
    """
    first = actors.generators[min(actors.generators)]
    t_lp = actors.policy.score_log_probs_ref(exp_ref)  # left in the object store: the generator reads it
    g_version, gap = get_restartable(lambda: first.sync_gap.remote(ticket, exp_ref, t_lp))
    if g_version != version:
        raise RuntimeError(f"weight sync: generator-{min(actors.generators)} holds v{g_version} after loading "
                           f"v{version}")
    return {"sync/logprob_max_diff": gap}


def step_metrics(taken, versions: list[int], step: int, pm: dict, cm: dict, kl_coef: float) -> dict[str, float]:
    n = sum(m.n for _, m in taken)
    tot = {k: sum(m.stats[k] for _, m in taken) for k in taken[0][1].stats}
    mean = tot["score_sum"] / n
    staleness = [step - v for v in versions]
    gen_s: dict[int, float] = {}  # generator -> its seconds generating this step's chunks
    for _, m in taken:
        gen_s[m.generator] = gen_s.get(m.generator, 0.0) + m.stats["generate_s"]
    sources = {}  # reward/<source>: each reward source's mean and std before weighting
    for key in tot:
        if key.startswith("source_sum/"):
            name = key.split("/", 1)[1]
            mu = tot[key] / n
            sources[f"reward/{name}"] = mu
            sources[f"reward/{name}_std"] = max(tot[f"source_sq/{name}"] / n - mu * mu, 0.0) ** 0.5
    dynamic = {f"dynamic/{k.removeprefix('dyn_')}": v for k, v in tot.items() if k.startswith("dyn_")}
    return {**pm, **cm, **sources, **dynamic,
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


def metrics_line(step: int, total: int, m: dict[str, float]) -> str:
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
