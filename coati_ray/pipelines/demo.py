"""The main job on the embedded defaults: SFT -> reward model on the demo task, on local Ray.

It reports what a user of RLHF cares about: the SFT policy's gold score on held-out prompts (not
only its loss) and the reward model's held-out accuracy. The PPO stage will join this pipeline.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from coati_ray.config import ClusterArgs, DataArgs, ModelArgs, RMArgs, TrainArgs
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
    strategy: str = "ddp"
    sft_epochs: int = 3
    rm_epochs: int = 2
    sft_lr: float = 5e-4
    rm_lr: float = 5e-4
    batch_size: int = 16
    eval_prompts: int = 200
    address: str | None = None


def held_out_prompts(n: int) -> list[str]:
    lines = Path(demo_file("prompts_eval.jsonl")).read_text(encoding="utf-8").splitlines()
    return [json.loads(l)["prompt"] for l in lines[:n]]


def run_demo(a: DemoArgs) -> dict:
    t0 = time.perf_counter()
    out = Path(a.out)
    cluster = ClusterArgs(trainers=a.trainers, address=a.address)
    sft = run_training("sft", ModelArgs(preset_size=a.preset_size), DataArgs(),
                       TrainArgs(strategy=a.strategy, batch_size=a.batch_size, max_epochs=a.sft_epochs, lr=a.sft_lr,
                                 log_interval=50, save_path=str(out / "sft")), cluster)
    t_sft = time.perf_counter() - t0
    rm = run_training("rm", ModelArgs(pretrain=str(out / "sft")), DataArgs(),
                      TrainArgs(strategy=a.strategy, batch_size=a.batch_size, max_epochs=a.rm_epochs, lr=a.rm_lr,
                                log_interval=50, save_path=str(out / "rm")), cluster, rm=RMArgs())
    t_rm = time.perf_counter() - t0 - t_sft
    prompts = held_out_prompts(a.eval_prompts)
    gold_base = evaluate_gold(load_causal_lm(_preset_path(a.preset_size)),
                              load_tokenizer(str(out / "sft")), prompts)
    gold_sft = evaluate_gold(load_causal_lm(str(out / "sft")), load_tokenizer(str(out / "sft")), prompts)
    summary = {
        "sft": {"first_train_loss": sft.history[0]["train/loss"], "eval_loss": sft.final_eval["eval/loss"],
                "seconds": round(t_sft, 1), "path": str(out / "sft")},
        "rm": {"eval_accuracy": rm.final_eval["eval/accuracy"], "eval_margin": rm.final_eval["eval/margin"],
               "seconds": round(t_rm, 1), "path": str(out / "rm")},
        "gold": {"untrained": gold_base.score, "sft": gold_sft.score, "prompts": gold_sft.n,
                 "examples": gold_sft.examples},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    return summary


def _preset_path(size: str) -> str:
    from coati_ray.models.loading import resolve_model_path

    return resolve_model_path(None, "llama", size)


# The stage-1/2 models PPO starts from when no --pretrain / --rm_path is given. The SFT is
# deliberately short (one epoch): a policy that already solves every demo problem would leave PPO
# nothing to improve, and the reward model trained from it still ranks held-out pairs well.
DEMO_MODEL_SETTINGS = {"sft_epochs": 1, "rm_epochs": 2, "lr": 5e-4, "batch_size": 16}


def ensure_demo_models(preset_size: str = "tiny", cluster: ClusterArgs | None = None) -> dict[str, str]:
    """Paths of the demo SFT policy and reward model under the cache, trained first if missing."""
    from coati_ray.defaults import _build_once, cache_dir

    s = DEMO_MODEL_SETTINGS
    cluster = cluster or ClusterArgs()
    root = cache_dir() / "demo_models" / preset_size

    def build(tmp: Path) -> None:
        logger.info("training the demo SFT and reward models once (about 4 minutes on 2 cores) into %s", root)
        run_training("sft", ModelArgs(preset_size=preset_size), DataArgs(),
                     TrainArgs(batch_size=s["batch_size"], max_epochs=s["sft_epochs"], lr=s["lr"], log_interval=50,
                               save_path=str(tmp / "sft")), cluster, progress=False)
        run_training("rm", ModelArgs(pretrain=str(tmp / "sft")), DataArgs(),
                     TrainArgs(batch_size=s["batch_size"], max_epochs=s["rm_epochs"], lr=s["lr"], log_interval=50,
                               save_path=str(tmp / "rm")), cluster, rm=RMArgs(), progress=False)
        for sub in ("sft", "rm"):
            shutil.rmtree(tmp / sub / "checkpoints", ignore_errors=True)

    _build_once(root, build)
    return {"sft": str(root / "sft"), "rm": str(root / "rm")}
