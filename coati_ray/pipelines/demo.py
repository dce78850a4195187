"""The main job on the embedded defaults: SFT -> reward model -> PPO on the demo task, on local Ray.

It reports what a user of RLHF cares about: the gold score (held-out problems answered
correctly) of the SFT policy and of the PPO policy, not only losses.

Recipe (why each step is there):
    1. SFT, one epoch: the policy PPO starts from. Deliberately short, so it still gets a third
       of the problems wrong: a policy that already solves everything leaves PPO nothing to do.
    2. SFT continued for more epochs: the reward model's starting point. A reward model learns
       to tell a wrong sum from a right one only from a backbone that already does the arithmetic
       (held-out accuracy 0.67 from the one-epoch SFT vs ~0.9 from a converged one here).
    3. RM on the demo pairs.
    4. PPO from (1) with the RM of (3); the reference is (1).
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
    sft_epochs: int = 1
    rm_base_epochs: int = 2
    rm_epochs: int = 2
    sft_lr: float = 5e-4
    rm_lr: float = 5e-4
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
    """Steps 1-3 of the recipe into out/sft, out/sft_rm_base, out/rm; returns their results."""
    def ta(path: str, epochs: int, lr: float) -> TrainArgs:
        return TrainArgs(strategy=a.strategy, batch_size=a.batch_size, max_epochs=epochs, lr=lr, log_interval=50,
                         save_path=str(out / path), seed=a.seed)

    t0 = time.perf_counter()
    sft = run_training("sft", ModelArgs(preset_size=a.preset_size), DataArgs(), ta("sft", a.sft_epochs, a.sft_lr),
                       cluster)
    base = run_training("sft", ModelArgs(pretrain=str(out / "sft")), DataArgs(),
                        ta("sft_rm_base", a.rm_base_epochs, a.sft_lr), cluster)
    t_sft = time.perf_counter() - t0
    rm = run_training("rm", ModelArgs(pretrain=str(out / "sft_rm_base")), DataArgs(), ta("rm", a.rm_epochs, a.rm_lr),
                      cluster, rm=RMArgs())
    return {"sft": sft, "sft_rm_base": base, "rm": rm, "t_sft": t_sft, "t_rm": time.perf_counter() - t0 - t_sft}


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
                "rm_base_eval_loss": st["sft_rm_base"].final_eval["eval/loss"], "seconds": round(st["t_sft"], 1),
                "path": str(out / "sft")},
        "rm": {"eval_accuracy": st["rm"].final_eval["eval/accuracy"], "eval_margin": st["rm"].final_eval["eval/margin"],
               "seconds": round(st["t_rm"], 1), "path": str(out / "rm")},
        "ppo": {"steps": len(h), "reward_first5": sum(m["reward/mean"] for m in h[:5]) / max(len(h[:5]), 1),
                "reward_last5": sum(m["reward/mean"] for m in h[-5:]) / max(len(h[-5:]), 1),
                "kl_last": h[-1]["kl/mean"] if h else None, "seconds": round(t_ppo, 1), "path": str(out / "ppo")},
        "gold": {"sft": gold["sft"].score, "ppo": gold["ppo"].score, "prompts": gold["sft"].n,
                 "examples": gold["ppo"].examples},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    return summary


def _preset_path(size: str) -> str:
    from coati_ray.models.loading import resolve_model_path

    return resolve_model_path(None, "llama", size)


def ensure_demo_models(preset_size: str = "tiny", cluster: ClusterArgs | None = None) -> dict[str, str]:
    """The demo SFT policy and reward model (recipe steps 1-3) under the cache, trained first if missing."""
    from coati_ray.defaults import _build_once, cache_dir

    root = cache_dir() / "demo_models" / preset_size

    def build(tmp: Path) -> None:
        logger.info("training the demo SFT and reward models once (about 6 minutes on 2 cores) into %s", root)
        train_stage12(DemoArgs(preset_size=preset_size), tmp, cluster or ClusterArgs())
        for sub in ("sft", "sft_rm_base", "rm"):
            shutil.rmtree(tmp / sub / "checkpoints", ignore_errors=True)

    _build_once(root, build)
    return {"sft": str(root / "sft"), "rm": str(root / "rm")}
