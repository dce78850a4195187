"""Code that runs inside vLLM's workers: weight loading for RLHF.

Modern vLLM mixes `CoatiWorkerExtension` into each of its workers (`worker_extension_cls`), so
`LLM.collective_rpc("coati_load_weights")` reaches every tensor-parallel rank through vLLM's own
public RPC; older vLLM (no worker extensions) is sent the function `load_named` through the same
RPC. Nothing here touches vLLM internals beyond the worker's `reload_weights` or, on old vLLM,
`model_runner.model.load_weights`, the loader every vLLM model implements for its HF checkpoint
names (it splits q/k/v and gate/up into vLLM's fused, sharded layers itself).

This module must not import vllm at import time: vLLM imports it in its worker processes.
"""

from __future__ import annotations


def load_named(worker, named: list | object) -> int:
    """Load (HF name, tensor) pairs into `worker`'s shard of the model; returns how many.

    `named` is the list itself (in-process engines) or an ObjectRef to it (Ray-executor
    workers read it from the object store). vLLM's `reload_weights` (>= 0.30) loads in
    checkpoint format and redoes the per-layer processing that loading did (CPU and
    quantized kernels repack weights after loading); older vLLM (the colossalai environment's
    0.7.2, which calls this function through `collective_rpc`) loads through the model.
    """
    if not isinstance(named, list):
        import ray

        named = ray.get(named)
    # vLLM copies each tensor into its parameters (the backend test overwrites an update
    # after loading it and checks the engine is unchanged): Ray's read-only views are fine.
    weights = iter(named)
    if hasattr(worker, "reload_weights"):
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    else:  # pragma: no cover - vLLM < 0.30
        worker.model_runner.model.load_weights(weights=weights)
    return len(named)


class CoatiWorkerExtension:
    def coati_load_weights(self, named: list | object) -> int:
        """`load_named` as a worker method (vLLM with `worker_extension_cls`)."""
        return load_named(self, named)
