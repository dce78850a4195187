"""Code that runs inside vLLM's workers (`worker_extension_cls`): weight loading for RLHF.

vLLM mixes this class into each of its workers, so `LLM.collective_rpc("coati_...")` reaches
every tensor-parallel rank through vLLM's own public RPC. Nothing here touches vLLM internals
beyond `self.model_runner.model.load_weights`, the loader every vLLM model implements for its
HF checkpoint names (it splits q/k/v and gate/up into vLLM's fused, sharded layers itself).

This module must not import vllm at import time: vLLM imports it in its worker processes.
"""

from __future__ import annotations


class CoatiWorkerExtension:
    def coati_load_weights(self, named: list | object) -> int:
        """Load (HF name, tensor) pairs into this worker's shard of the model; returns how many.

        `named` is the list itself (in-process engines) or an ObjectRef to it (Ray-executor
        workers read it from the object store). vLLM's `reload_weights` (>= 0.30) loads in
        checkpoint format and redoes the per-layer processing that loading did (CPU and
        quantized kernels repack weights after loading); older vLLM loads through the model.
        """
        if not isinstance(named, list):
            import ray

            named = ray.get(named)
        # vLLM copies each tensor into its parameters (the backend test overwrites an update
        # after loading it and checks the engine is unchanged): Ray's read-only views are fine.
        weights = iter(named)
        if hasattr(self, "reload_weights"):
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        else:  # pragma: no cover - vLLM < 0.30 (the colossalai environment's 0.7.3)
            self.model_runner.model.load_weights(weights=weights)
        return len(named)
