"""Weight sync: how the policy's new weights reach the generators, behind one interface.

The driver holds one `WeightSync` (see `base.py`) and never asks which transport it is. Each
transport is one module here; adding one is that module plus its line in `TRANSPORTS`:

    object_store   trainer rank 0 publishes each version once into Ray's object store; every
                   generator loads it before its next rollout (any backend, LoRA adapters only)
    nccl           trainer rank 0 broadcasts each version into every vLLM engine worker over
                   NCCL with vLLM's weight-transfer API (GPU, full weights)
"""

from __future__ import annotations

import importlib

# flag value (--vllm_weight_sync) -> "module:class"; imported only when used
TRANSPORTS: dict[str, str] = {
    "object_store": "coati_ray.sync.object_store:ObjectStoreSync",
    "nccl": "coati_ray.sync.nccl:NcclSync",
}


def transport_class(name: str):
    """The `WeightSync` subclass registered as `name`."""
    from coati_ray.errors import ConfigError

    if name not in TRANSPORTS:
        raise ConfigError("vllm_weight_sync", f"unknown transport {name!r}; expected one of {', '.join(TRANSPORTS)}")
    module, cls = TRANSPORTS[name].split(":")
    return getattr(importlib.import_module(module), cls)
