"""Trainer strategies: how a model is wrapped for data parallelism and how its state is gathered.

| name              | shards                                  | runs on   |
|-------------------|-----------------------------------------|-----------|
| ddp               | nothing (gradients all-reduced)         | CPU, GPU  |
| fsdp              | params, grads, optimizer state (FSDP2)  | CPU, GPU  |
| colossalai_zero2  | grads + optimizer state (ZeRO-2)        | GPU       |
| colossalai_gemini | chunked params + CPU-offloaded optimizer| GPU       |
| colossalai_ddp    | nothing                                 | CPU, GPU  |
| colossalai_hybrid | nothing (tp = pp = 1, ZeRO off)         | CPU, GPU  |

ddp is torch DDP, fsdp torch FSDP2 (`fully_shard`): both here. The colossalai ones are plugins of
one `Booster`, in `colossalai_strategy.py`. Every strategy implements the hooks of
`strategy_base.Strategy`; `make_strategy` builds one by name.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from coati_ray.config import STRATEGIES
from coati_ray.engines.colossalai_strategy import (
    CPU_BOOSTERS,
    GPU_ONLY,
    BoosterStrategy,
    require_colossalai,
)
from coati_ray.engines.strategy_base import Strategy
from coati_ray.errors import ConfigError


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
    def no_sync(self, model: nn.Module, sync: bool, optimizer: Any = None) -> Iterator[None]:
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
    def no_sync(self, model: nn.Module, sync: bool, optimizer: Any = None) -> Iterator[None]:
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


def make_strategy(name: str, device: torch.device, *, grad_clip: float = 0.0, accumulation_steps: int = 1,
                  dtype: str = "fp32") -> Strategy:
    """The strategy `name` for a trainer on `device`.

    grad_clip / accumulation_steps / dtype matter only to the colossalai strategies, whose plugins
    fix them when built (ddp/fsdp take the clip norm per step).
    """
    if name == "ddp":
        return DDPStrategy(device)
    if name == "fsdp":
        return FSDPStrategy(device)
    if name in GPU_ONLY + CPU_BOOSTERS:
        require_colossalai(f"--strategy {name}")
        if name in GPU_ONLY and device.type != "cuda":
            raise ConfigError("strategy", f"{name} needs a CUDA GPU (colossalai's ZeRO/Gemini kernels run on CUDA "
                              "only); on CPU use colossalai_ddp or colossalai_hybrid (the same colossalai booster "
                              "path), or ddp / fsdp (fsdp shards parameters, gradients and optimizer state like "
                              "ZeRO-3)")
        return BoosterStrategy(name, device, grad_clip=grad_clip, accumulation_steps=accumulation_steps, dtype=dtype)
    raise ConfigError("strategy", f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
