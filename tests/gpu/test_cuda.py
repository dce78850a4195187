"""Checks that need one CUDA GPU (skipped elsewhere; `bash scripts/gpu_check.sh` runs them).

- an NCCL process group with our ddp and fsdp strategies: equal losses, full state dicts
- bf16 autocast training on CUDA
- SFT through a GPU trainer actor on Ray
- a PPO step with the vllm backend on the GPU (when vLLM is importable)
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL group on cuda:0: the collectives our strategies call run through NCCL."""
    import torch.distributed as dist

    from coati_ray.workers.rank import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def _train(strategy_name: str, micro_model: str, steps: int, bf16: bool) -> tuple[list[float], dict]:
    from coati_ray.engines.strategy import make_strategy
    from coati_ray.models.loading import load_causal_lm

    device = torch.device("cuda", 0)
    strategy = make_strategy(strategy_name, device)
    torch.manual_seed(0)
    model = strategy.wrap(load_causal_lm(micro_model, "auto", "fp32"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (8, 32), generator=g).to(device)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        strategy.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    sd, _ = strategy.state_dicts(model, None)
    return losses, sd


def test_ddp_and_fsdp_agree_over_nccl(nccl_group, micro_model):
    ddp, ddp_sd = _train("ddp", micro_model, 5, bf16=False)
    fsdp, fsdp_sd = _train("fsdp", micro_model, 5, bf16=False)
    assert ddp[-1] < ddp[0]
    assert max(abs(a - b) for a, b in zip(ddp, fsdp)) < 1e-4, (ddp, fsdp)
    assert ddp_sd.keys() == fsdp_sd.keys()
    assert all(t.device.type == "cpu" for t in fsdp_sd.values())  # gathered to CPU for saving and sync
    assert max(float((ddp_sd[k] - fsdp_sd[k]).abs().max()) for k in ddp_sd) < 1e-4
    t = torch.ones(4, device="cuda")
    nccl_group.all_reduce(t)
    assert nccl_group.get_backend() == "nccl" and float(t.sum()) == 4.0


def test_bf16_autocast_trains_close_to_fp32(nccl_group, micro_model):
    fp32, _ = _train("ddp", micro_model, 5, bf16=False)
    bf16, _ = _train("fsdp", micro_model, 5, bf16=True)
    assert bf16[-1] < bf16[0] and all(math.isfinite(x) for x in bf16)  # learns, no NaN
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05, (fp32, bf16)  # bf16 rounding, not a bug


def test_sft_in_a_gpu_trainer_actor(ray_cluster, tmp_path):
    from coati_ray.config import ClusterArgs, ModelArgs, SFTDataArgs, TrainArgs
    from coati_ray.pipelines.supervised import run_training

    out = run_training("sft", ModelArgs(preset_size="micro", dtype="bf16"), SFTDataArgs(max_samples=400),
                       TrainArgs(batch_size=16, max_steps=12, lr=3e-3, save_path=str(tmp_path), log_interval=1000),
                       ClusterArgs(trainers=1, gpus_per_trainer=1), progress=False)
    losses = [m["train/loss"] for m in out.history]
    assert len(losses) == 12 and losses[-1] < losses[0]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_ppo_with_vllm_on_the_gpu(ray_cluster, tmp_path, train_micro_pair):
    from coati_ray.config import ClusterArgs
    from coati_ray.pipelines.ppo import run_ppo
    from coati_ray.ppo_config import PPOConfig

    cl = ClusterArgs(trainers=1, gpus_per_trainer=0.2)
    sft, rm = train_micro_pair(tmp_path, sft_samples=400, cluster=cl)
    cfg = PPOConfig.of(pretrain=sft, rm_path=rm, generator_backend="vllm", vllm_gpu_memory_utilization=0.2,
                       experience_batch_size=16, train_batch_size=8, max_new_tokens=16, lr=1e-3, max_steps=3,
                       sync_check_interval=1, save_path=str(tmp_path / "ppo"), actors=1, generator_gpus=0.2,
                       reference_gpus=0.1, reward_gpus=0.1, critic_gpus=0.2)
    cfg.cluster = cl
    out = run_ppo(cfg, progress=False)
    assert len(out.history) == 3
    assert max(m["sync/logprob_max_diff"] for m in out.history) < 1e-3  # fp32 on GPU kernels (TF32 off)
    assert [set(v) for v in out.trained_versions] == [{0}, {1}, {2}]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or torch.cuda.device_count() < 2,
                    reason="needs vLLM and 2 GPUs (NCCL refuses two ranks on one GPU)")
def test_ppo_with_nccl_weight_sync_into_vllm(ray_cluster, tmp_path, train_micro_pair):
    from coati_ray.pipelines.ppo import run_ppo
    from coati_ray.ppo_config import PPOConfig

    sft, rm = train_micro_pair(tmp_path, sft_samples=400)
    cfg = PPOConfig.of(pretrain=sft, rm_path=rm, generator_backend="vllm", vllm_weight_sync="nccl",
                       vllm_gpu_memory_utilization=0.3, experience_batch_size=16, train_batch_size=8,
                       max_new_tokens=16, lr=1e-3, max_steps=3, sync_check_interval=1, save_path=str(tmp_path / "ppo"),
                       actors=1, generator_gpus=1, trainers=1, gpus_per_trainer=1)
    out = run_ppo(cfg, progress=False)
    assert max(m["sync/logprob_max_diff"] for m in out.history) < 1e-3  # the broadcast landed in the engine
    assert [set(v) for v in out.trained_versions] == [{0}, {1}, {2}]
