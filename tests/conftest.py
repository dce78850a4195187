"""Shared fixtures: one private cache of embedded defaults and one local Ray cluster per session.

Ray starts once (about 10 s here) and every Ray test shares it. Tests build tiny models from
config; nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile

import pytest

# Before anything imports coati_ray.defaults or starts Ray, so that actors inherit it.
os.environ.setdefault("COATI_RAY_CACHE", tempfile.mkdtemp(prefix="coati_ray_test_cache_"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_dir():
    from coati_ray.defaults import demo_data_dir

    return demo_data_dir()


@pytest.fixture(scope="session")
def micro_model():
    """Path of the micro llama preset (HF directory with tokenizer)."""
    from coati_ray.defaults import default_model_dir

    return str(default_model_dir("llama", "micro"))


@pytest.fixture(scope="session")
def tokenizer(micro_model):
    from coati_ray.models.loading import load_tokenizer

    return load_tokenizer(micro_model)


@pytest.fixture(scope="session")
def llama_h256(tokenizer, tmp_path_factory):
    """A random bf16 llama of hidden size 256 (head size 64) with the micro tokenizer: the sizes that
    vLLM's CPU kernels take their AMX and GPTQ paths for (our presets' 176 and 44 are not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama_h256") / "l256"
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if ray.is_initialized():  # the simulated cluster of tests/cluster, when its teardown has not run yet
        ray.shutdown()
    # Logical CPUs: a PPO run starts up to 7 one-CPU actors; they share the real cores.
    ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="coati_ray_tests", logging_level="ERROR",
             runtime_env={"env_vars": {"COATI_RAY_CACHE": os.environ["COATI_RAY_CACHE"],
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _train_micro_pair(root, sft_samples: int | None = None, sft_epochs: int = 1, rm_samples: int = 400,
                      cluster=None) -> tuple[str, str]:
    """A micro SFT policy and a reward model trained from it, under `root`: (sft dir, rm dir)."""
    from coati_ray.config import ClusterArgs, ModelArgs, PairDataArgs, RMArgs, SFTDataArgs, TrainArgs
    from coati_ray.pipelines.supervised import run_training

    cluster = cluster or ClusterArgs(trainers=1)
    sft, rm = str(root / "sft"), str(root / "rm")
    run_training("sft", ModelArgs(preset_size="micro"), SFTDataArgs(max_samples=sft_samples),
                 TrainArgs(batch_size=16, max_epochs=sft_epochs, lr=3e-3, save_path=sft, log_interval=1000),
                 cluster, progress=False)
    run_training("rm", ModelArgs(pretrain=sft), PairDataArgs(max_samples=rm_samples),
                 TrainArgs(batch_size=16, max_epochs=1, lr=1e-3, save_path=rm, log_interval=1000),
                 cluster, RMArgs(), progress=False)
    return sft, rm


@pytest.fixture(scope="session")
def train_micro_pair():
    """The function that trains a micro SFT + RM pair (PPO tests start from one)."""
    return _train_micro_pair
