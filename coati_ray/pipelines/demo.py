"""The main job on the embedded defaults: SFT -> reward model -> PPO on the demo task, on local Ray.

It reports what a user of RLHF cares about: the gold score (held-out problems answered
correctly) of the SFT policy and of the PPO policy, not only losses.

Recipe (ColossalChat's three stages, in order):
    1. SFT on the demonstrations, three epochs: the arithmetic is learnt (held-out eval loss
       0.08), but half of the demonstrations stop at the equation without the graded
       final-answer sentence, and the SFT policy copies that style on most prompts (greedy gold
       0.105-0.305 on 200 held-out prompts over seeds 42, 1, 2; see `coati_ray.data.demo`).
    2. RM from the SFT model on the preference pairs (held-out accuracy 0.96). Its lr is lower
       than SFT's: at 5e-4 it stalled at 0.67 accuracy (previous, single-style demo data), at
       2e-4 it reaches 0.96-0.99.
    3. PPO from the SFT policy against that RM; the reference is the SFT policy. It learns the
       preferred style without losing the arithmetic: gold 0.975-0.985 over the same seeds.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from coati_ray.config import ClusterArgs, DataArgs, ModelArgs, PPOArgs, RMArgs, RoleArgs, TrainArgs
from coati_ray.defaults import demo_file
from coati_ray.evaluation.gold import evaluate_gold
from coati_ray.models.loading import load_causal_lm, load_tokenizer
from coati_ray.pipelines.supervised import run_training

logger = logging.getLogger(__name__)


@dataclass
class DemoArgs:
    out: str = "outputs/demo"
    preset_size: str = "tiny"
    trainers: int = 1
    actors: int = 1
    strategy: str = "ddp"
    sft_epochs: int = 3
    rm_epochs: int = 2
    sft_lr: float = 5e-4
    rm_lr: float = 2e-4
    batch_size: int = 16
    ppo_steps: int = 30
    ppo_lr: float = 2e-5
    critic_lr: float = 1e-4
    seed: int = 42
    eval_prompts: int = 200
    address: str | None = None


def held_out_prompts(n: int) -> list[str]:
    lines = Path(demo_file("prompts_eval.jsonl")).read_text(encoding="utf-8").splitlines()
    return [json.loads(l)["prompt"] for l in lines[:n]]


def train_stage12(a: DemoArgs, out: Path, cluster: ClusterArgs) -> dict:
    """Steps 1-2 of the recipe into out/sft and out/rm; returns their results."""
    def ta(path: str, epochs: int, lr: float) -> TrainArgs:
        return TrainArgs(strategy=a.strategy, batch_size=a.batch_size, max_epochs=epochs, lr=lr, log_interval=50,
                         save_path=str(out / path), seed=a.seed)

    t0 = time.perf_counter()
    sft = run_training("sft", ModelArgs(preset_size=a.preset_size), DataArgs(), ta("sft", a.sft_epochs, a.sft_lr),
                       cluster)
    t_sft = time.perf_counter() - t0
    rm = run_training("rm", ModelArgs(pretrain=str(out / "sft")), DataArgs(), ta("rm", a.rm_epochs, a.rm_lr),
                      cluster, rm=RMArgs())
    return {"sft": sft, "rm": rm, "t_sft": t_sft, "t_rm": time.perf_counter() - t0 - t_sft}


def run_demo(a: DemoArgs) -> dict:
    from coati_ray.pipelines.ppo import run_ppo

    t0 = time.perf_counter()
    out = Path(a.out)
    cluster = ClusterArgs(trainers=a.trainers, address=a.address)
    st = train_stage12(a, out, cluster)
    t1 = time.perf_counter()
    ppo = run_ppo(ModelArgs(pretrain=str(out / "sft")), DataArgs(),
                  PPOArgs(rm_path=str(out / "rm"), strategy=a.strategy, max_steps=a.ppo_steps, lr=a.ppo_lr,
                          critic_lr=a.critic_lr, experience_batch_size=32, train_batch_size=16 // a.trainers or 1,
                          max_new_tokens=32, seed=a.seed, save_path=str(out / "ppo"), log_interval=5),
                  RoleArgs(actors=a.actors), ClusterArgs(trainers=a.trainers, address=a.address))
    t_ppo = time.perf_counter() - t1
    prompts = held_out_prompts(a.eval_prompts)
    tok = load_tokenizer(str(out / "sft"))
    gold = {name: evaluate_gold(load_causal_lm(str(out / name)), tok, prompts) for name in ("sft", "ppo")}
    h = ppo.history
    summary = {
        "sft": {"first_train_loss": st["sft"].history[0]["train/loss"], "eval_loss": st["sft"].final_eval["eval/loss"],
                "seconds": round(st["t_sft"], 1),
                "path": str(out / "sft")},
        "rm": {"eval_accuracy": st["rm"].final_eval["eval/accuracy"], "eval_margin": st["rm"].final_eval["eval/margin"],
               "seconds": round(st["t_rm"], 1), "path": str(out / "rm")},
        "ppo": {"steps": len(h), "reward_first5": sum(m["reward/mean"] for m in h[:5]) / max(len(h[:5]), 1),
                "reward_last5": sum(m["reward/mean"] for m in h[-5:]) / max(len(h[-5:]), 1),
                "kl_last": h[-1]["kl/mean"] if h else None, "seconds": round(t_ppo, 1), "path": str(out / "ppo")},
        "gold": {"sft": gold["sft"].score, "ppo": gold["ppo"].score, "prompts": gold["sft"].n,
                 "arithmetic": {"sft": gold["sft"].arithmetic, "ppo": gold["ppo"].arithmetic},
                 "examples": [{"prompt": p, "sft": r_sft, "sft_score": s_sft, "ppo": r_ppo, "ppo_score": s_ppo}
                              for (p, r_sft, s_sft), (_, r_ppo, s_ppo) in zip(gold["sft"].examples,
                                                                              gold["ppo"].examples)]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    return summary


def _preset_path(size: str) -> str:
    from coati_ray.models.loading import resolve_model_path

    return resolve_model_path(None, "llama", size)


def ensure_demo_models(preset_size: str = "tiny", cluster: ClusterArgs | None = None) -> dict[str, str]:
    """The demo SFT policy and reward model (recipe steps 1-2) under the cache, trained first if missing."""
    from coati_ray.defaults import _build_once, cache_dir

    root = cache_dir() / "demo_models" / preset_size

    def build(tmp: Path) -> None:
        logger.info("training the demo SFT and reward models once (about 5 minutes on 2 cores) into %s", root)
        train_stage12(DemoArgs(preset_size=preset_size), tmp, cluster or ClusterArgs())
        for sub in ("sft", "rm"):
            shutil.rmtree(tmp / sub / "checkpoints", ignore_errors=True)

    _build_once(root, build)
    return {"sft": str(root / "sft"), "rm": str(root / "rm")}
