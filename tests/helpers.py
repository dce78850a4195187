"""Helpers shared by the trainer test suites (tests/ray, tests/colossalai_booster).

Importable as `helpers`: tests/conftest.py's folder is on sys.path for every test.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file

from coati_ray.config import ClusterArgs, DataArgs, ModelArgs, RMArgs, TrainArgs
from coati_ray.pipelines.supervised import run_training


def train(tmp_path, name, stage="sft", trainers=1, strategy="ddp", batch_size=4, accumulation=1, max_steps=6,
          local=False, data=None, model=None, **train_kw):
    """An SFT (or RM) run of the micro preset on 400 demo rows, saved under tmp_path/name."""
    ta = TrainArgs(strategy=strategy, batch_size=batch_size, accumulation_steps=accumulation, max_steps=max_steps,
                   save_path=str(tmp_path / name), log_interval=1000, warmup_ratio=0.0, **train_kw)
    return run_training(stage, model or ModelArgs(preset_size="micro"), data or DataArgs(max_samples=400), ta,
                        ClusterArgs(trainers=trainers), RMArgs() if stage == "rm" else None, local=local,
                        progress=False)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def wait_dead(ray, actor, method: str, timeout_s: float = 60.0) -> bool:
    """True once a call of `method` on `actor` fails as dead. ray.kill is asynchronous: a call sent
    right after it can still be served (seen in full test runs), so look again until it is not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(getattr(actor, method).remote())
        except ray.exceptions.RayActorError:
            return True
    return False
