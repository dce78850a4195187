"""Weight sync over NCCL into vLLM engines (`--vllm_weight_sync nccl`), with vLLM's own
weight-transfer API (vLLM >= 0.32: `weight_transfer_config={"backend": "nccl"}`).

One NCCL group per run: trainer rank 0 is rank 0 and sends; every worker of every engine
receives, generator i's workers at ranks `1 + sum(tp of generators before i)`. The group is
vLLM's stateless one (not torch.distributed's default group), so it lives beside the trainers'
own group. Each publish:

    trainers:  every rank gathers the full state dict; rank 0 returns what engines must allocate
    at once:   every generator: start_weight_update -> update_weights(meta) -> finish (receives)
               trainer rank 0 broadcasts each tensor in the declared order

When `publish` returns, every engine holds the new version, so the ticket loads nothing. Only
full weights travel this way (LoRA runs use the object store, where the generator merges the
adapter), the engines are fixed at start-up (no scaling, no restarts), and it needs CUDA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from coati_ray.errors import ConfigError
from coati_ray.runtime import get_unwrapped
from coati_ray.sync.base import WeightSync, WeightTicket


@dataclass(frozen=True)
class PushedTicket(WeightTicket):
    def bring_up_to_date(self, generator) -> float:
        if generator.version < self.version:  # the push reaches every engine before a ticket exists
            raise RuntimeError(f"generator-{generator.index} holds v{generator.version}, but v{self.version} "
                               "was pushed to every engine over NCCL")
        return 0.0


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
    return NcclMeta([name_map(k) for k in state_dict],
                    [str(t.dtype).removeprefix("torch.") for t in state_dict.values()],
                    [list(t.shape) for t in state_dict.values()])


class NcclSync(WeightSync):
    restartable_generators = False  # a restarted engine cannot rejoin the group
    scalable = False  # the group is fixed at start-up

    @classmethod
    def check_config(cls, rollout, model) -> None:
        if rollout.generator_backend != "vllm":
            raise ConfigError("vllm_weight_sync", "nccl is for the vllm generator backend")
        if model.lora_rank:
            raise ConfigError("vllm_weight_sync", "LoRA runs sync through the object store (the generator "
                              "merges the adapter); use object_store")

    @classmethod
    def engine_options(cls) -> dict[str, Any]:
        return {"weight_transfer_config": {"backend": "nccl"}}

    def connect(self, generators: dict[int, Any], version: int) -> WeightTicket:
        """Form the group: trainer rank 0 (sender) and every worker of every engine."""
        self.generators = dict(generators)
        addr, port = self.policy.rendezvous()
        handles = list(self.generators.values())
        offsets, world = engine_ranks(get_unwrapped([g.run.remote(_engine_workers) for g in handles]))
        get_unwrapped(self.policy.run_refs(_trainer_open, addr, port, world)
                      + [g.run.remote(_engine_join, addr, port, off, world) for g, off in zip(handles, offsets)])
        if version > 0:  # a resumed run: the engines loaded the initial policy
            self._push(version)
        return PushedTicket(version)

    def publish(self, version: int) -> WeightTicket:
        self._push(version)
        return PushedTicket(version)

    def _push(self, version: int) -> float:
        """Every rank gathers `version`; rank 0 broadcasts it into every engine. The slowest load (s)."""
        update_info = self.policy.run(_trainer_gather, version)[0]
        loads = [g.run.remote(_engine_receive, version, update_info) for g in self.generators.values()]
        get_unwrapped(loads + [self.policy.run_rank0_ref(_trainer_broadcast)])
        return max(get_unwrapped(loads))

    def on_generator_removed(self, index: int) -> None:
        # a broadcast would wait forever for the missing engine
        raise RuntimeError(f"generator-{index} died and --vllm_weight_sync nccl cannot go on without it "
                           "(the NCCL group is fixed at start-up); continue with --resume auto")


# --- trainer side (run on PolicyWorker ranks) ---------------------------------------------------------
def _trainer_open(worker, master_address: str, master_port: int, world_size: int) -> None:
    """Rank 0 joins the group as its sender (blocks until every engine worker joins)."""
    if worker.rank != 0:
        return
    from coati_ray.errors import require

    require("vllm", "vllm", "--vllm_weight_sync nccl (trainer side)")
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    worker.transport_state["nccl_group"] = trainer_init({"master_address": master_address, "master_port": master_port,
                                                         "world_size": world_size})


def _trainer_gather(worker, version: int) -> dict | None:
    """Every rank gathers the full weights; rank 0 keeps them and returns what engines must allocate."""
    from coati_ray.engines.vllm_backend import hf_name

    update = worker.publish(version)
    if update is None:
        return None
    worker.transport_state["pending"] = update.tensors
    return meta_of(update.tensors, hf_name).as_update_info()


def _trainer_broadcast(worker) -> None:
    """Rank 0 sends every gathered tensor, in the order `_trainer_gather` declared."""
    state_dict = worker.transport_state.pop("pending")
    group = worker.transport_state["nccl_group"]
    stream = torch.cuda.current_stream()
    for t in state_dict.values():
        group.broadcast(t.to("cuda", non_blocking=True).contiguous(), src=0, stream=stream)
    stream.synchronize()


# --- engine side (run on GeneratorWorkers, whose backend is a VLLMBackend) ------------------------------
def _engine_workers(generator) -> int:
    """How many ranks this generator's engine takes in the group (its tensor-parallel size)."""
    tp = getattr(generator.backend, "tensor_parallel_size", None)
    if tp is None:
        raise ConfigError("vllm_weight_sync", f"nccl pushes into vLLM engines, and generator-{generator.index} runs "
                          f"{type(generator.backend).__name__}; use --generator_backend vllm or object_store")
    return tp


def _engine_join(generator, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
    """Join the group; blocks until trainer rank 0 joins too."""
    if not torch.cuda.is_available():
        raise ConfigError("vllm_weight_sync", "nccl needs CUDA GPUs; on CPU use object_store")
    generator.backend.collective_rpc("init_weight_transfer_engine", {
        "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
        "world_size": world_size, "packed": False})


def _engine_receive(generator, version: int, update_info: dict) -> float:
    """Receive one full update broadcast by trainer rank 0 (names, dtype_names, shapes); seconds taken."""
    t0 = time.perf_counter()
    for method, args in (("start_weight_update", ()), ("update_weights", (update_info,)), ("finish_weight_update", ())):
        generator.backend.collective_rpc(method, *args)
    generator.backend.reset_prefix_cache()  # cached KV blocks hold activations of the old weights
    generator.version = version
    return time.perf_counter() - t0
