"""Weight sync between a policy trainer and a generator backend, in-process (no Ray).

Workers are plain classes, so the exact code the actors run is tested here directly.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import rollout

from coati_ray.config import ModelArgs, PromptDataArgs
from coati_ray.engines.backends import make_backend
from coati_ray.engines.generation import WeightUpdate
from coati_ray.ppo_config import ObjectiveArgs
from coati_ray.workers.job import PolicyJob, UpdateSpec
from coati_ray.workers.policy import PolicyWorker

TOL = 1e-5  # max |log-prob difference| allowed between generator and trainer (float32 noise is ~1e-6)


def make_job(micro_model, lora_rank=0) -> PolicyJob:
    update = UpdateSpec("ddp", lr=1e-6, grad_clip=1.0, train_batch_size=16, max_epochs=1, seed=42)
    return PolicyJob(model=ModelArgs(pretrain=micro_model, lora_rank=lora_rank), policy_path=micro_model, update=update,
                     objective=ObjectiveArgs(), temperature=1.0, pretrain_file=None, data=PromptDataArgs())


def through_store(update: WeightUpdate) -> WeightUpdate:
    """Pickle as Ray's object store does: protocol 5, large buffers out of band, read back read-only."""
    buffers: list[pickle.PickleBuffer] = []
    inband = pickle.dumps(update, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(inband, buffers=[bytes(b.raw()) for b in buffers])  # bytes: read-only, like the store


def perturb_trainable(worker: PolicyWorker) -> None:
    """Stand-in for an optimizer step: move every trainable tensor."""
    with torch.no_grad():
        for p in worker.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_after_a_sync_generator_and_trainer_log_probs_agree(micro_model, demo_dir, tokenizer, lora_rank):
    job = make_job(micro_model, lora_rank)
    trainer = PolicyWorker(0, 1)
    trainer.setup(job)
    gen = make_backend("hf", micro_model, "auto", "fp32", job.lora, tokenizer.eos_token_id, tokenizer.pad_token_id,
                       torch.device("cpu"), job.update.seed)
    exp = rollout(gen, tokenizer)
    before = gen.log_probs(exp.sequences, exp.attention_mask, exp.num_actions)
    perturb_trainable(trainer)
    gen.load_weights(through_store(trainer.publish(1)))
    after = gen.log_probs(exp.sequences, exp.attention_mask, exp.num_actions)
    trained = trainer.score_log_probs(exp)
    m = exp.action_mask
    assert ((after - trained) * m).abs().max() < TOL
    assert ((after - before) * m).abs().max() > 100 * TOL  # the update did change the generator


def test_lora_update_carries_only_adapter_tensors(micro_model, demo_dir):
    trainer = PolicyWorker(0, 1)
    trainer.setup(make_job(micro_model, lora_rank=4))
    full = PolicyWorker(0, 1)
    full.setup(make_job(micro_model))
    lora_update, full_update = trainer.publish(1), full.publish(1)
    lora_names = {n for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora_update.adapter_only and not full_update.adapter_only
    assert len(lora_names) > 0
    # the update holds exactly the adapter tensors (state-dict names drop nothing but the parameter prefix)
    assert len(lora_update.tensors) == len(lora_names)
    assert all("lora_" in k for k in lora_update.tensors)
    assert lora_update.num_bytes < 0.5 * full_update.num_bytes


def test_weight_update_travels_out_of_band_and_keeps_dtype_and_shape():
    """Each tensor is one out-of-band buffer (Ray maps it from shared memory: no copy at get)."""
    tensors = {"w": torch.randn(6, 4), "wt": torch.randn(4, 6).t(), "bf16": torch.randn(5).to(torch.bfloat16),
               "scalar": torch.tensor(2.5), "ids": torch.arange(7)}
    update = WeightUpdate(7, tensors, adapter_only=True)
    buffers: list[pickle.PickleBuffer] = []
    inband = pickle.dumps(update, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(tensors)
    assert sum(b.raw().nbytes for b in buffers) == update.num_bytes
    assert len(inband) < 1000  # names, dtypes and shapes only
    back = pickle.loads(inband, buffers=[bytes(b.raw()) for b in buffers])
    assert (back.version, back.adapter_only) == (7, True)
    for k, t in tensors.items():
        assert back.tensors[k].dtype == t.dtype and back.tensors[k].shape == t.shape
        assert torch.equal(back.tensors[k], t)


def test_nccl_sync_group_ranks_put_the_trainer_first_and_engines_after_it():
    from coati_ray.sync.nccl import engine_ranks

    assert engine_ranks([1, 1, 1]) == ([1, 2, 3], 4)
    assert engine_ranks([2, 4]) == ([1, 3], 7)  # each engine's tp workers take consecutive ranks


def test_nccl_weight_sync_needs_the_vllm_backend_and_full_weights():
    from coati_ray.errors import ConfigError
    from coati_ray.ppo_config import PPOConfig

    with pytest.raises(ConfigError, match="--vllm_weight_sync: nccl is for the vllm generator backend"):
        PPOConfig.of(vllm_weight_sync="nccl").validate()
    with pytest.raises(ConfigError, match="--vllm_weight_sync: LoRA runs sync through the object store"):
        PPOConfig.of(vllm_weight_sync="nccl", generator_backend="vllm", lora_rank=4).validate()
    PPOConfig.of(vllm_weight_sync="nccl", generator_backend="vllm").validate()
    expected = "--vllm_weight_sync: unknown transport 'ipc'; expected one of object_store, nccl"
    with pytest.raises(ConfigError, match=expected):
        PPOConfig.of(vllm_weight_sync="ipc").validate()
