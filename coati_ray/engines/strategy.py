"""Trainer strategies: how a model is wrapped for data parallelism and how its state is gathered.

| name              | shards                                  | runs on   |
|-------------------|-----------------------------------------|-----------|
| ddp               | nothing (gradients all-reduced)         | CPU, GPU  |
| fsdp              | params, grads, optimizer state (FSDP2)  | CPU, GPU  |
| colossalai_zero2  | grads + optimizer state (ZeRO-2)        | GPU (issue 4) |
| colossalai_gemini | chunked params + offloaded optimizer    | GPU (issue 4) |

Every strategy gives the same three things to the training loop: `wrap` the model,
`no_sync` during gradient accumulation, and full (rank-0) state dicts for saving and weight sync.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from coati_ray.errors import ConfigError


class Strategy(ABC):
    name: str

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Make the model data-parallel. The returned module is what forward() is called on."""

    @abstractmethod
    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside the wrapper (whose state-dict names are the HF names)."""

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce for micro-batches that are not the last of a step."""
        yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
        """(model state, optimizer state), full and on CPU on rank 0, empty elsewhere.

        Uses torch.distributed.checkpoint's state_dict API, which speaks both DDP and FSDP2 and keys
        the optimizer state by parameter name (so it reloads under a different world size).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        inner = self.unwrap(model) if not self.shards_params else model
        if optimizer is None:
            return get_model_state_dict(inner, options=opts), {}
        return get_state_dict(inner, optimizer, options=opts)

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                         optim_sd: dict | None) -> None:
        """Inverse of `state_dicts`: every rank passes the same full dicts (read from a checkpoint)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        opts = StateDictOptions(full_state_dict=True)
        inner = self.unwrap(model) if not self.shards_params else model
        if optimizer is None or optim_sd is None:
            set_model_state_dict(inner, model_sd, options=opts)
        else:
            set_state_dict(inner, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)

    shards_params = False


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: peft/value heads can leave parameters out of a forward pass.
        return DDP(model, device_ids=ids, find_unused_parameters=False)

    def unwrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return model.module if isinstance(model, DDP) else model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if sync or not hasattr(model, "no_sync"):
            yield
        else:
            with model.no_sync():
                yield


class FSDPStrategy(Strategy):
    """torch FSDP2 (`fully_shard`): each transformer block is one shard unit, then the root."""

    name = "fsdp"
    shards_params = True

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = model.to(self.device)
        if not dist.is_initialized():
            return model
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        block_names = set(getattr(_hf_model(model), "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(sync)
        yield


def _hf_model(model: nn.Module) -> nn.Module:
    """The HF PreTrainedModel inside a peft wrapper (where `_no_split_modules` lives)."""
    while not hasattr(model, "_no_split_modules") and hasattr(model, "base_model") and model.base_model is not model:
        model = model.base_model
    if not hasattr(model, "_no_split_modules") and hasattr(model, "model"):
        model = model.model
    return model


def make_strategy(name: str, device: torch.device) -> Strategy:
    if name == "ddp":
        return DDPStrategy(device)
    if name == "fsdp":
        return FSDPStrategy(device)
    if name in ("colossalai_zero2", "colossalai_gemini"):
        from coati_ray.errors import require

        require("colossalai", "colossalai", f"--strategy {name}")
        raise ConfigError("strategy", f"{name} needs a CUDA GPU and arrives with the GPU engines; on CPU use "
                          "ddp or fsdp (fsdp shards parameters, gradients and optimizer state like ZeRO-3)")
    raise ConfigError("strategy", f"unknown strategy {name!r}; expected one of ddp, fsdp, colossalai_zero2, "
                      "colossalai_gemini")
