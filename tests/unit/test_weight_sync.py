"""Weight sync between a policy trainer and a generator backend, in-process (no Ray).

Workers are plain classes, so the exact code the actors run is tested here directly.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from coati_ray.config import DataArgs, ModelArgs, PPOArgs
from coati_ray.data.formatting import render_prompt
from coati_ray.engines.generation import SamplingParams, WeightUpdate, make_backend
from coati_ray.experience import Experience
from coati_ray.workers.job import PPOJob
from coati_ray.workers.policy import PolicyWorker

TOL = 1e-5  # max |log-prob difference| allowed between generator and trainer (float32 noise is ~1e-6)


def make_job(micro_model, demo_dir, lora_rank=0):
    return PPOJob(micro_model, micro_model, None, str(demo_dir / "prompts_train.jsonl"), None,
                  ModelArgs(pretrain=micro_model, lora_rank=lora_rank), DataArgs(), PPOArgs())


def rollout(backend, tokenizer) -> Experience:
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
    job = make_job(micro_model, demo_dir, lora_rank)
    trainer = PolicyWorker(0, 1)
    trainer.setup_ppo(job)
    gen = make_backend("hf", micro_model, "auto", "fp32", job.lora, tokenizer.eos_token_id, tokenizer.pad_token_id,
                       torch.device("cpu"), job.ppo.seed)
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
    trainer.setup_ppo(make_job(micro_model, demo_dir, lora_rank=4))
    full = PolicyWorker(0, 1)
    full.setup_ppo(make_job(micro_model, demo_dir))
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
    from coati_ray.engines.vllm_nccl import engine_ranks

    assert engine_ranks([1, 1, 1]) == ([1, 2, 3], 4)
    assert engine_ranks([2, 4]) == ([1, 3], 7)  # each engine's tp workers take consecutive ranks


def test_nccl_weight_sync_needs_the_vllm_backend():
    from coati_ray.config import PPOArgs
    from coati_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="--vllm_weight_sync: nccl is for the vllm generator backend"):
        PPOArgs(vllm_weight_sync="nccl").validate()
