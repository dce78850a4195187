"""The generation backend factory: builds the engine a generator actor samples with.

Kept apart from `generation.py` (the interface and the `hf` backend) so that the interface does
not import the engines that implement it (`vllm_backend.py` imports `generation.py`).
"""

from __future__ import annotations

import torch

from coati_ray.engines.generation import GenerationBackend, HFBackend
from coati_ray.errors import ConfigError

BACKENDS = ("hf", "vllm")


def make_backend(name: str, model_path: str, model_family: str, dtype: str, lora: dict | None,
                 eos_token_id: int, pad_token_id: int, device: torch.device, seed: int, max_model_len: int = 512,
                 vllm_options: dict | None = None) -> GenerationBackend:
    """Build backend `name` on the policy at `model_path` (with the trainer's LoRA layout if any).

    `vllm_options`: tensor_parallel_size, gpu_memory_utilization, enforce_eager, engine_options (vllm only).
    """
    if name == "hf":
        from coati_ray.models.loading import load_causal_lm
        from coati_ray.models.lora import apply_lora

        model = load_causal_lm(model_path, model_family, dtype)
        if lora:  # same adapter layout as the trainer, so adapter-only updates find their names
            torch.manual_seed(seed)
            model = apply_lora(model, lora["rank"], lora["alpha"], 0.0, lora["target_modules"], "causal_lm")
        return HFBackend(model, eos_token_id, pad_token_id, device)
    if name == "vllm":
        from coati_ray.engines.vllm_backend import VLLMBackend

        return VLLMBackend(model_path, dtype, lora, eos_token_id, pad_token_id, seed, max_model_len,
                           **(vllm_options or {}))
    raise ConfigError("generator_backend", f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
