"""The main job on the embedded defaults: SFT -> reward model -> PPO on the demo task, on local Ray.

It reports what a user of RLHF cares about: the gold score (held-out problems answered
correctly) of the SFT policy and of the PPO policy, not only losses.

Recipe (ColossalChat's three stages, in order):
    1. SFT on the demonstrations, three epochs: the arithmetic is learnt (held-out eval loss
       0.08), but half of the demonstrations stop at the equation without the graded
       final-answer sentence, and the SFT policy copies that style on most prompts (greedy gold
       0.235-0.385 on 200 held-out prompts over seeds 42, 1, 2; see `coati_ray.data.demo`).
    2. RM from the SFT model on the preference pairs (held-out accuracy 0.86-0.995). Its lr is lower
       than SFT's: at 5e-4 it stalled at 0.67 accuracy (previous, single-style demo data), at
       2e-4 it reaches 0.96-0.99.
    3. PPO from the SFT policy against that RM; the reference is the SFT policy. It learns the
       preferred style without losing the arithmetic: gold 0.980 over the same seeds.
    (--recipe dpo replaces 2-3 by DPO from the SFT policy on the same pairs: gold 0.950-0.975.)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coati_ray.config import ClusterArgs, _at_least, _help, _positive_or_none
from coati_ray.pipelines.demo_models import DemoRecipeArgs, train_stage12

logger = logging.getLogger(__name__)
DPO_LR = 1e-4


@dataclass
class DemoArgs(DemoRecipeArgs):
    """The demo's flags: the recipe's steps 1-2 (`DemoRecipeArgs`), PPO, evaluation and where it runs."""

    out: str = _help("Output directory (sft/, rm/, ppo/, demo_summary.json); a previous demo's outputs there are "
                     "replaced.", default="outputs/demo")
    trainers: int = _help("Trainer actors of every stage (one torch.distributed group).", default=1)
    actors: int = _help("PPO generator actors.", default=1)
    ppo_steps: int = _help("PPO steps.", default=30)
    ppo_lr: float = _help("PPO policy learning rate.", default=2e-5)
    critic_lr: float = _help("PPO critic learning rate.", default=1e-4)
    eval_prompts: int = _help("Held-out prompts the SFT and PPO policies are gold-scored on.", default=200)
    address: str | None = _help("Ray cluster to join (e.g. 'auto'); default: an embedded local Ray.",
                                   default=None)
    recipe: Literal["rlhf", "rlvr", "dapo", "dpo"] = _help(
        "rlhf: SFT -> reward model -> PPO against it (ColossalChat's three stages). rlvr: SFT -> GRPO with a "
        "verifiable reward (--reward_fn, default the demo's gold verifier), no reward model, no critic. dapo: "
        "rlvr with DAPO's settings (clip-higher 0.2 / 0.28, dynamic sampling, token-mean loss, no KL). dpo: SFT -> "
        "DPO on the preference pairs, no reward model, no sampling.", default="rlhf")
    dpo_lr: float = _help("dpo: peak learning rate.", default=DPO_LR)
    dpo_epochs: int = _help("dpo: passes over the preference pairs.", default=1)
    dpo_beta: float = _help("dpo: beta.", default=0.1)
    reward_fn: str | None = _help("rlvr / dapo: the reward (a built-in verifier or 'path/to/file.py:name'); "
                                  "default: demo.", default=None)

    def validate(self) -> None:
        DemoRecipeArgs.validate(self)
        for name in ("trainers", "actors", "ppo_steps", "eval_prompts", "dpo_epochs"):
            _at_least(self, 1, name)
        for name in ("ppo_lr", "critic_lr", "dpo_lr", "dpo_beta"):
            _positive_or_none(self, name)


def held_out_prompts(n: int) -> list[str]:
    from coati_ray.defaults import demo_file

    lines = Path(demo_file("prompts_eval.jsonl")).read_text(encoding="utf-8").splitlines()
    return [json.loads(l)["prompt"] for l in lines[:n]]


def run_demo(a: DemoArgs) -> dict:
    a.validate()
    t0 = time.perf_counter()
    out = Path(a.out)
    cluster = ClusterArgs(trainers=a.trainers, address=a.address)
    st = train_stage12(a, out, cluster, reward_model=a.recipe == "rlhf")
    t1 = time.perf_counter()
    if a.recipe == "dpo":
        return finish_dpo(a, out, cluster, st, t0, t1)
    return finish_ppo(a, out, st, t0, t1)


def finish_ppo(a: DemoArgs, out: Path, st: dict, t0: float, t1: float) -> dict:
    """The last step of the rlhf / rlvr / dapo recipes: PPO (or GRPO) from the SFT policy, then the gold scores."""
    from coati_ray.pipelines.ppo import run_ppo
    from coati_ray.ppo_config import PPOConfig

    common = dict(pretrain=str(out / "sft"), strategy=a.strategy, max_steps=a.ppo_steps, lr=a.ppo_lr,
                  train_batch_size=16 // a.trainers or 1, max_new_tokens=32, seed=a.seed, save_path=str(out / "ppo"),
                  log_interval=5, actors=a.actors, trainers=a.trainers, address=a.address, overwrite=True)
    if a.recipe == "rlhf":
        cfg = PPOConfig.of(rm_path=str(out / "rm"), critic_lr=a.critic_lr, experience_batch_size=32, **common)
    else:  # the same 32 samples a step: 8 prompts x 4 samples, compared within each prompt's group
        dapo = dict(eps_clip_low=0.2, eps_clip_high=0.28, dynamic_sampling=True, loss_agg="token_mean",
                    kl_coef=0.0) if a.recipe == "dapo" else {}
        cfg = PPOConfig.of(reward_fn=a.reward_fn or "demo", advantage_estimator="grpo", experience_batch_size=8,
                           n_samples_per_prompt=4, **dapo, **common)
    ppo = run_ppo(cfg)
    t_ppo = time.perf_counter() - t1
    gold = _gold(a, out, "ppo")
    h = ppo.history
    summary = {
        "sft": _sft_summary(st, out),
        "recipe": a.recipe, "reward": "rm" if a.recipe == "rlhf" else a.reward_fn or "demo",
        "rm": None if st["rm"] is None else {
            "eval_accuracy": st["rm"].final_eval["eval/accuracy"], "eval_margin": st["rm"].final_eval["eval/margin"],
            "seconds": round(st["t_rm"], 1), "path": str(out / "rm")},
        "ppo": {"steps": len(h), "reward_first5": sum(m["reward/mean"] for m in h[:5]) / max(len(h[:5]), 1),
                "reward_last5": sum(m["reward/mean"] for m in h[-5:]) / max(len(h[-5:]), 1),
                "kl_last": h[-1]["kl/mean"] if h else None, "seconds": round(t_ppo, 1), "path": str(out / "ppo")},
        "gold": _gold_summary(gold, "ppo"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return _write_summary(out, summary)


def finish_dpo(a: DemoArgs, out: Path, cluster: ClusterArgs, st: dict, t0: float, t1: float) -> dict:
    """Step 2 of the dpo recipe: DPO from the SFT policy on the demo pairs (its reference: the SFT policy)."""
    from coati_ray.config import ModelArgs, PreferenceArgs, PreferenceDataArgs, TrainArgs
    from coati_ray.pipelines.supervised import run_training

    ta = TrainArgs(strategy=a.strategy, batch_size=a.batch_size, max_epochs=a.dpo_epochs, lr=a.dpo_lr, log_interval=50,
                   save_path=str(out / "dpo"), seed=a.seed, overwrite=True)
    dpo = run_training("dpo", ModelArgs(pretrain=str(out / "sft")), PreferenceDataArgs(), ta, cluster,
                       pref=PreferenceArgs(loss="dpo", beta=a.dpo_beta))
    t_dpo = time.perf_counter() - t1
    ev = dpo.final_eval
    summary = {"sft": _sft_summary(st, out), "recipe": "dpo", "reward": None, "rm": None,
               "dpo": {"steps": len(dpo.history), "eval_accuracy": ev.get("eval/rewards/accuracy"),
                       "eval_margin": ev.get("eval/rewards/margin"), "reference_seconds": dpo.setup.reference_seconds,
                       "seconds": round(t_dpo, 1), "path": str(out / "dpo")},
               "gold": _gold_summary(_gold(a, out, "dpo"), "dpo"), "seconds": round(time.perf_counter() - t0, 1)}
    return _write_summary(out, summary)


def _write_summary(out: Path, summary: dict) -> dict:
    """demo_summary.json, and report.png / report.html beside it (`coati report`)."""
    from coati_ray.report import write_report

    (out / "demo_summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    png, _ = write_report(out)
    logger.info("curves: %s (and report.html)", png)
    return summary


def _sft_summary(st: dict, out: Path) -> dict:
    return {"first_train_loss": st["sft"].history[0]["train/loss"], "eval_loss": st["sft"].final_eval["eval/loss"],
            "seconds": round(st["t_sft"], 1), "path": str(out / "sft")}


def _gold(a: DemoArgs, out: Path, final: str) -> dict:
    from coati_ray.evaluation.gold import evaluate_gold
    from coati_ray.models.loading import load_causal_lm, load_tokenizer

    prompts = held_out_prompts(a.eval_prompts)
    tok = load_tokenizer(str(out / "sft"))
    return {name: evaluate_gold(load_causal_lm(str(out / name)), tok, prompts) for name in ("sft", final)}


def _gold_summary(gold: dict, final: str) -> dict:
    s, f = gold["sft"], gold[final]
    return {"sft": s.score, final: f.score, "prompts": s.n, "arithmetic": {"sft": s.arithmetic, final: f.arithmetic},
            "examples": [{"prompt": p, "sft": r_s, "sft_score": x_s, final: r_f, f"{final}_score": x_f}
                         for (p, r_s, x_s), (_, r_f, x_f) in zip(s.examples, f.examples)]}
