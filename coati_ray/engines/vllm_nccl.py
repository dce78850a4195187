"""GPU weight sync into vLLM engines over NCCL (`--vllm_weight_sync nccl`), with vLLM's own
weight-transfer API (vLLM >= 0.32: `weight_transfer_config={"backend": "nccl"}`).

One NCCL group per run: trainer rank 0 is rank 0 and sends; every worker of every engine
receives, generator i's workers at ranks `1 + sum(tp of generators before i)`. The group is
vLLM's stateless one (not torch.distributed's default group), so it lives beside the trainers'
own group. Each sync:

    driver:   meta = trainer rank 0's (name, dtype, shape) list, in the order it will send
    at once:  every generator: start_weight_update -> update_weights(meta) -> finish (receives)
              every trainer rank: gather the full state dict; rank 0 broadcasts each tensor

The trainer side is here; the engine side is `VLLMBackend.nccl_connect` / `nccl_receive`.
Only full weights travel this way (LoRA runs use the object-store path, which merges adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NcclMeta:
    """What the engines must allocate for one sync, in send order (HF checkpoint names)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def as_update_info(self) -> dict:
        return {"names": self.names, "dtype_names": self.dtype_names, "shapes": self.shapes}


def engine_ranks(tensor_parallel_sizes: list[int]) -> tuple[list[int], int]:
    """(rank offset of each engine, world size) of the sync group; the trainer sender is rank 0."""
    offsets, r = [], 1
    for tp in tensor_parallel_sizes:
        offsets.append(r)
        r += tp
    return offsets, r


def meta_of(state_dict: dict[str, torch.Tensor], name_map) -> NcclMeta:
    return NcclMeta([name_map(k) for k in state_dict], [str(t.dtype).removeprefix("torch.") for t in state_dict.values()],
                    [list(t.shape) for t in state_dict.values()])


class NcclSender:
    """Trainer rank 0's end of the group (needs CUDA and vllm importable in the trainer's environment)."""

    def __init__(self, master_address: str, master_port: int, world_size: int):
        from coati_ray.errors import require

        require("vllm", "vllm", "--vllm_weight_sync nccl (trainer side)")
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.group = trainer_init({"master_address": master_address, "master_port": master_port,
                                   "world_size": world_size})

    def send(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Broadcast every tensor, in `state_dict` order (the order `meta_of` declared)."""
        stream = torch.cuda.current_stream()
        for t in state_dict.values():
            self.group.broadcast(t.to("cuda", non_blocking=True).contiguous(), src=0, stream=stream)
        stream.synchronize()
