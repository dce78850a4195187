"""The trainer strategy interface: how a model is wrapped for data parallelism and how its state is gathered.

Every strategy gives the training loop the same hooks: `prepare` (wrap the model, build its
AdamW), `backward`, `no_sync` during gradient accumulation, `optimizer_step` (clip + step, returns
the gradient norm), `schedulable` (the torch optimizer an LR scheduler drives), and full (rank-0,
CPU) state dicts with the HF names for saving and weight sync. The defaults here are the plain
torch loop (ddp, fsdp: `strategy.py`); the colossalai strategies (`colossalai_strategy.py`)
override them. `strategy.make_strategy` builds one by name.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn


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
    def no_sync(self, model: nn.Module, sync: bool, optimizer: Any = None) -> Iterator[None]:
        """Skip the gradient all-reduce for micro-batches that are not the last of a step."""
        yield

    # --- the training loop's hooks; the defaults are the plain torch loop ------------------------
    def prepare(self, model: nn.Module, lr: float, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999)) -> tuple[nn.Module, Any]:
        """(the wrapped model, its AdamW over the trainable parameters)."""
        model = self.wrap(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=weight_decay, betas=betas)
        return model, optimizer

    def schedulable(self, optimizer: Any) -> torch.optim.Optimizer:
        """The torch optimizer whose param_groups' lr the step reads: what an LR scheduler drives."""
        return optimizer

    def backward(self, loss: torch.Tensor, model: nn.Module, optimizer: Any) -> None:
        loss.backward()

    def optimizer_step(self, model: nn.Module, optimizer: Any, max_norm: float) -> float:
        """Clip the gradients to `max_norm` (0: no clipping) and step; the gradient norm before clipping."""
        norm = self.clip_grad_norm(model, max_norm)
        optimizer.step()
        return norm

    def close(self) -> None:
        """Release what the strategy holds beyond the model (process groups of its own)."""

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
    # Resumable checkpoints go through torch.distributed.checkpoint: each rank writes what it holds
    # (its FSDP2 shards; DDP's replicated tensors are written once, spread over the ranks), and a
    # checkpoint loads under another world size. False: gathered on rank 0 into one file (colossalai).
    sharded_checkpoint = True

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """{"model": ..., "optim": ...} as this rank holds them (DTensor shards under FSDP2), keyed by
        parameter name: what `dcp.save` writes and, as a template of shapes, what `dcp.load` fills.
        The optimizer's state exists before its first step too (the state_dict API creates it)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        inner = self.unwrap(model) if not self.shards_params else model
        model_sd, optim_sd = get_state_dict(inner, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Inverse of `checkpoint_state`, with `state` filled by `dcp.load`."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        inner = self.unwrap(model) if not self.shards_params else model
        set_state_dict(inner, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
