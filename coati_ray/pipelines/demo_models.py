"""Steps 1-2 of the demo recipe (SFT, then the reward model from it), and the cached demo models
that stage 3 starts from when it is given no --pretrain / --rm_path.

Both the demo (`pipelines/demo.py`) and PPO (`pipelines/ppo.py`) use this module; it imports
neither of them, so the two do not import each other.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coati_ray.config import ClusterArgs, Strategy, _at_least, _help, _positive_or_none

logger = logging.getLogger(__name__)


@dataclass
class DemoRecipeArgs:
    """The knobs of recipe steps 1-2 (the defaults are the recipe; see `pipelines/demo.py`)."""

    preset_size: Literal["tiny", "micro"] = _help("Size of the embedded llama preset the SFT starts from: tiny "
                                                  "(~4M params) or micro (~0.2M, for tests).", default="tiny")
    strategy: Strategy = _help("Trainer strategy of every stage.", default="ddp")
    sft_epochs: int = _help("SFT passes over the demonstrations.", default=3)
    rm_epochs: int = _help("Reward-model passes over the preference pairs.", default=2)
    sft_lr: float = _help("SFT peak learning rate.", default=5e-4)
    rm_lr: float = _help("Reward-model peak learning rate.", default=2e-4)
    batch_size: int = _help("SFT and reward-model micro-batch size per trainer.", default=16)
    seed: int = _help("Seed of every stage; the same seed gives the same run.", default=42)

    def validate(self) -> None:
        from coati_ray.config import check_finite, check_seed

        check_finite(self)  # nan passes every `> 0` check
        check_seed(self.seed)
        for name in ("sft_epochs", "rm_epochs", "batch_size"):
            _at_least(self, 1, name)
        for name in ("sft_lr", "rm_lr"):
            _positive_or_none(self, name)


def _train_args(a: DemoRecipeArgs, out: Path, path: str, epochs: int, lr: float):
    from coati_ray.config import TrainArgs

    return TrainArgs(strategy=a.strategy, batch_size=a.batch_size, max_epochs=epochs, lr=lr, log_interval=50,
                     save_path=str(out / path), seed=a.seed, overwrite=True)  # the recipe reruns from scratch


def train_stage12(a: DemoRecipeArgs, out: Path, cluster: ClusterArgs, reward_model: bool = True) -> dict:
    """Steps 1-2 of the recipe into out/sft and out/rm (step 1 only without `reward_model`); their results."""
    a.validate()
    from coati_ray.config import ModelArgs, SFTDataArgs
    from coati_ray.pipelines.supervised import run_training

    t0 = time.perf_counter()
    sft = run_training("sft", ModelArgs(preset_size=a.preset_size), SFTDataArgs(),
                       _train_args(a, out, "sft", a.sft_epochs, a.sft_lr), cluster)
    t_sft = time.perf_counter() - t0
    st = {"sft": sft, "rm": None, "t_sft": t_sft, "t_rm": 0.0}
    return train_reward_model(a, out, cluster, st) if reward_model else st


def train_reward_model(a: DemoRecipeArgs, out: Path, cluster: ClusterArgs, st: dict) -> dict:
    """Step 2 of the recipe: the reward model from out/sft; `st` (step 1's results) with it added."""
    from coati_ray.config import ModelArgs, PairDataArgs, RMArgs
    from coati_ray.pipelines.supervised import run_training

    t0 = time.perf_counter()
    rm = run_training("rm", ModelArgs(pretrain=str(out / "sft")), PairDataArgs(),
                      _train_args(a, out, "rm", a.rm_epochs, a.rm_lr), cluster, rm=RMArgs())
    return {**st, "rm": rm, "t_rm": time.perf_counter() - t0}


def ensure_demo_models(preset_size: str = "tiny", cluster: ClusterArgs | None = None) -> dict[str, str]:
    """The demo SFT policy and reward model (recipe steps 1-2) under the cache, trained first if missing."""
    from coati_ray.defaults import _build_once, cache_dir

    root = cache_dir() / "demo_models" / preset_size

    def build(tmp: Path) -> None:
        logger.info("training the demo SFT and reward models once (about 5 minutes on 2 cores) into %s", root)
        train_stage12(DemoRecipeArgs(preset_size=preset_size), tmp, cluster or ClusterArgs())
        for sub in ("sft", "rm"):
            shutil.rmtree(tmp / sub / "checkpoints", ignore_errors=True)

    _build_once(root, build)
    return {"sft": str(root / "sft"), "rm": str(root / "rm")}
