"""Helpers shared by the trainer test suites (tests/ray, tests/colossalai_booster).

Importable as `helpers`: tests/conftest.py's folder is on sys.path for every test.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file

from coati_ray.config import ClusterArgs, ModelArgs, PairDataArgs, RMArgs, SFTDataArgs, TrainArgs
from coati_ray.experience import Experience
from coati_ray.pipelines.supervised import run_training


def train(tmp_path, name, stage="sft", trainers=1, strategy="ddp", batch_size=4, accumulation=1, max_steps=6,
          local=False, data=None, model=None, **train_kw):
    """An SFT (or RM) run of the micro preset on 400 demo rows, saved under tmp_path/name."""
    ta = TrainArgs(strategy=strategy, batch_size=batch_size, accumulation_steps=accumulation, max_steps=max_steps,
                   save_path=str(tmp_path / name), log_interval=1000, warmup_ratio=0.0, **train_kw)
    data = data or (PairDataArgs if stage == "rm" else SFTDataArgs)(max_samples=400)
    return run_training(stage, model or ModelArgs(preset_size="micro"), data, ta,
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


def rollout(backend, tokenizer) -> Experience:
    """Two prompts (English, Chinese) sampled by `backend`: the experience a weight-sync check scores."""
    from coati_ray.data.formatting import render_prompt
    from coati_ray.engines.generation import SamplingParams

    texts = ["Tom has 3 apples and gets 4 more. How many?", "小明有5个苹果。"]
    prompts = [tokenizer(render_prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in texts]
    out = backend.generate(prompts, SamplingParams(max_new_tokens=8, seed=0))
    P, A = max(map(len, prompts)), max(len(g.token_ids) for g in out)
    seq = torch.full((2, P + A), tokenizer.pad_token_id)
    mask, amask = torch.zeros_like(seq), torch.zeros(2, A)
    for i, (p, g) in enumerate(zip(prompts, out)):
        seq[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p), 1
        seq[i, P:P + len(g.token_ids)], mask[i, P:P + len(g.token_ids)] = torch.tensor(g.token_ids), 1
        amask[i, :len(g.token_ids)] = 1
    z = torch.zeros(2)
    return Experience(seq, mask, amask, torch.zeros(2, A), z, torch.arange(2), z.long(), z.long())
