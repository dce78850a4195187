"""The colossalai trainer strategies (see `strategy.py` for all of them).

| name              | shards                                  | runs on   |
|-------------------|-----------------------------------------|-----------|
| colossalai_zero2  | grads + optimizer state (ZeRO-2)        | GPU       |
| colossalai_gemini | chunked params + CPU-offloaded optimizer| GPU       |
| colossalai_ddp    | nothing                                 | CPU, GPU  |
| colossalai_hybrid | nothing (tp = pp = 1, ZeRO off)         | CPU, GPU  |

The strategies are plugins of one `Booster`: `LowLevelZeroPlugin(stage=2)` (fp32 master
weights), `GeminiPlugin(placement_policy="static", offload_optim_frac=1.0)` (bf16 compute,
colossalai's `HybridAdam`), `TorchDDPPlugin`, and `HybridParallelPlugin(tp_size=1, pp_size=1,
zero_stage=0, precision="fp32")`. They implement the hooks of `strategy_base.Strategy` (whose
defaults are the plain torch loop of ddp and fsdp) through that one `Booster`, so `colossalai_ddp`
and `colossalai_hybrid` (which run on CPU) exercise the code path of `colossalai_zero2` and
`colossalai_gemini`.

colossalai is imported only when a colossalai strategy is made. Its plugins need a default
process group: the trainers' own (`runtime.process_group_backend`) is used; a single trainer, which has
none, gets a one-rank group (`colossalai.launch` is not needed). A colossalai checkpoint's
optimizer state is in the plugin's own (index-keyed) layout: it resumes under the same strategy
and world size. ddp/fsdp checkpoints key it by parameter name.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from coati_ray.engines.strategy_base import Strategy
from coati_ray.errors import ConfigError
from coati_ray.runtime import process_group_backend

logger = logging.getLogger(__name__)

GPU_ONLY = ("colossalai_zero2", "colossalai_gemini")
CPU_BOOSTERS = ("colossalai_ddp", "colossalai_hybrid")


class BoosterStrategy(Strategy):
    """One colossalai `Booster` with the plugin named by the strategy.

    The model and an AdamW (Gemini: colossalai's `HybridAdam`, the only optimizers GeminiOptimizer
    takes) are built on the raw model, then `booster.boost`ed. The plugins that own the gradients
    (ZeRO-2, Gemini, hybrid) clip inside their step, so `grad_clip` is fixed when the strategy is
    made; with `grad_clip` 0 they get an infinite max norm, which clips nothing but still reports
    the norm.

    Precision: `colossalai_ddp` and `colossalai_hybrid` keep fp32 weights (the trainer's bf16
    autocast applies as with ddp); `colossalai_zero2` keeps bf16 working weights with fp32 masters
    when `dtype` is bf16, else fp32; `colossalai_gemini` supports only fp16/bf16 and always computes
    in bf16 (fp32 masters). Gradient accumulation: `booster.no_sync` where the plugin supports it
    (ddp, hybrid); ZeRO-2 reduce-scatters every micro-batch into its gradient partition, which
    accumulates; Gemini is built with `enable_gradient_accumulation` when `accumulation_steps` > 1.

    Full state dicts (rank 0, CPU, HF names, the raw model's dtypes): ddp/hybrid from the
    unwrapped module; ZeRO-2 from the fp32 master shards, all-gathered (so a bf16 run saves and
    resumes its masters exactly); Gemini from `GeminiDDP.state_dict(only_rank_0=True)`, which
    gathers the weights in bf16 (a Gemini checkpoint resumes from bf16-rounded weights, as
    colossalai's own does).
    """

    # ZeRO-2 and Gemini keep optimizer state in their own flat, sharded layouts, which the
    # torch.distributed.checkpoint state_dict API cannot name: their checkpoints are gathered on rank 0.
    sharded_checkpoint = False

    def __init__(self, name: str, device: torch.device, grad_clip: float = 0.0, accumulation_steps: int = 1,
                 dtype: str = "fp32"):
        super().__init__(device)
        self.name, self.grad_clip, self.accumulation_steps, self.dtype = name, grad_clip, accumulation_steps, dtype
        self.booster = self.plugin = self._optimizer = None
        self._dtypes: dict[str, torch.dtype] = {}
        require_colossalai(f"--strategy {name}")

    # --- building -----------------------------------------------------------------------------------
    def _max_norm(self) -> float:
        return self.grad_clip if self.grad_clip > 0 else float("inf")

    def _make_plugin(self):
        from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin

        if self.name == "colossalai_ddp":
            return TorchDDPPlugin()
        if self.name == "colossalai_hybrid":
            # make_vocab_size_divisible_by=1: no padded embedding/LM head, so the HF shapes stay
            return HybridParallelPlugin(tp_size=1, pp_size=1, zero_stage=0, precision="fp32",
                                        max_norm=self._max_norm(), make_vocab_size_divisible_by=1)
        if self.name == "colossalai_zero2":
            return LowLevelZeroPlugin(stage=2, precision="bf16" if self.dtype == "bf16" else "fp32",
                                      max_norm=self._max_norm())
        if self.dtype != "bf16":
            logger.warning("colossalai_gemini computes in bf16 (it supports only fp16/bf16); fp32 master weights "
                           "and optimizer state")
        return GeminiPlugin(placement_policy="static", offload_optim_frac=1.0, precision="bf16",
                            max_norm=self._max_norm(), enable_gradient_accumulation=self.accumulation_steps > 1)

    def _ensure_process_group(self) -> None:
        """colossalai's plugins need a default group; a single trainer gets a one-rank one."""
        if not dist.is_initialized():
            dist.init_process_group(process_group_backend(self.device), store=dist.HashStore(),
                                    rank=0, world_size=1)

    def prepare(self, model: nn.Module, lr: float, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999)) -> tuple[nn.Module, Any]:
        from colossalai.booster import Booster

        from coati_ray.models.lora import is_peft

        if is_peft(model) and self.name in ("colossalai_gemini", "colossalai_hybrid"):
            raise ConfigError("strategy", f"{self.name} does not train LoRA adapters here; use colossalai_zero2, "
                              "colossalai_ddp, ddp or fsdp with --lora_rank")
        self._ensure_process_group()
        self._dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        if self.name == "colossalai_hybrid" and getattr(model, "config", None) is not None:
            model.config.use_cache = False  # shardformer's forward drops the KV cache anyway (and warns)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.name == "colossalai_gemini":
            from colossalai.nn.optimizer import HybridAdam

            optimizer = HybridAdam(params, lr=lr, weight_decay=weight_decay, betas=betas, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
        self.plugin = self._make_plugin()
        self.booster = Booster(plugin=self.plugin)
        model, optimizer, *_ = self.booster.boost(model, optimizer)
        self._optimizer = optimizer  # ZeRO-2's masters live in it (state dicts read them)
        return model, optimizer

    def wrap(self, model: nn.Module) -> nn.Module:
        raise TypeError(f"{self.name}: use prepare(), which boosts the model together with its optimizer")

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.unwrap(unwrap_peft=False) if hasattr(model, "unwrap") else model

    def schedulable(self, optimizer: Any) -> torch.optim.Optimizer:
        # OptimizerWrapper (and LowLevelZeroOptimizer, GeminiOptimizer) step the wrapped torch optimizer,
        # reading the lr from its param_groups (ZeRO/Gemini swap only their "params" entries).
        return optimizer.unwrap()

    # --- the step -----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, model: nn.Module, optimizer: Any) -> None:
        self.booster.backward(loss, optimizer)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool, optimizer: Any = None) -> Iterator[None]:
        if sync or not self.plugin.support_no_sync():
            yield  # ZeRO-2 / Gemini accumulate in their own gradient stores (see the class docstring)
        else:
            with self.booster.no_sync(model, optimizer):
                yield

    def optimizer_step(self, model: nn.Module, optimizer: Any, max_norm: float) -> float:
        if self.name == "colossalai_ddp":  # TorchDDPPlugin leaves clipping to the caller
            norm = optimizer.clip_grad_by_norm(max_norm if max_norm > 0 else float("inf"))
            optimizer.step()
            return float(norm)
        optimizer.step()  # clips to the plugin's max_norm (= grad_clip) and records the norm
        norm = optimizer.get_grad_norm()
        return float("nan") if norm is None else float(norm)

    def close(self) -> None:
        mesh = getattr(self.plugin, "pg_mesh", None)
        if mesh is not None and dist.is_initialized():
            mesh.destroy_mesh_process_groups()
            mesh._ranks_to_group.clear()  # the plugin's __del__ destroys them again otherwise
        self.booster = self.plugin = None

    # --- state --------------------------------------------------------------------------------------
    def _to_cpu(self, sd: dict) -> dict:
        out = {}
        for k, v in sd.items():
            v = v.detach().to("cpu", copy=True)
            dtype = self._dtypes.get(k)
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        return out

    def _model_state(self, model: nn.Module) -> dict:
        """The full model state on rank 0 (a collective for ZeRO-2 and Gemini); {} elsewhere."""
        if self.name == "colossalai_gemini":
            sd = model.state_dict(only_rank_0=True)
        elif self.name == "colossalai_zero2":
            sd = self._zero_master_state(model)
        else:
            sd = self.unwrap(model).state_dict()
        return self._to_cpu(sd) if self.rank == 0 else {}

    def _zero_master_state(self, model: nn.Module) -> dict:
        """The unwrapped module's state dict with every trained parameter replaced by its fp32 master."""
        from colossalai.zero.low_level._utils import all_gather_into_flat_tensor_nd, get_nd_world_size

        optimizer = self._optimizer
        model._force_wait_all_gather()
        inner = self.unwrap(model)
        sd = inner.state_dict()
        for name, p in inner.named_parameters():
            master = optimizer.working_to_master_param.get(id(p))
            if master is None or name not in sd:
                continue
            pg = optimizer.param_to_pg[p]
            full = torch.empty(master.numel() * get_nd_world_size(pg), dtype=master.dtype, device=self.device)
            all_gather_into_flat_tensor_nd(full, master.to(self.device).flatten(), pg)
            sd[name] = full[:p.numel()].view(p.shape)
        return sd

    def _load_zero_masters(self, model: nn.Module, model_sd: dict) -> None:
        """Inverse of `_zero_master_state`: each rank keeps its shard of the fp32 values."""
        from colossalai.zero.low_level._utils import get_nd_rank, get_nd_world_size

        optimizer = self._optimizer
        for name, p in self.unwrap(model).named_parameters():
            master = optimizer.working_to_master_param.get(id(p))
            if master is None:
                continue
            pg = optimizer.param_to_pg[p]
            ws, rank = get_nd_world_size(pg), get_nd_rank(pg)
            flat = model_sd[name].to(master.device, master.dtype).flatten()
            flat = torch.nn.functional.pad(flat, [0, optimizer.get_param_padding_size(p)])
            with torch.no_grad():
                master.copy_(flat.chunk(ws)[rank])

    def state_dicts(self, model: nn.Module, optimizer: Any) -> tuple[dict, dict]:
        """(model state, optimizer state), full and on CPU on rank 0, empty elsewhere; every rank calls."""
        model_sd = self._model_state(model)
        if optimizer is None:
            return model_sd, {}
        if self.name == "colossalai_zero2":
            optim_sd = optimizer.state_dict(only_on_master=True)
        elif self.name == "colossalai_gemini":
            optim_sd = optimizer.state_dict(only_rank_0=True)
        else:
            optim_sd = optimizer.state_dict()  # the live state tensors: copied below
        if self.rank != 0:
            return model_sd, {}
        from torch.utils._pytree import tree_map

        return model_sd, tree_map(lambda v: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v, optim_sd)

    def load_state_dicts(self, model: nn.Module, optimizer: Any, model_sd: dict, optim_sd: dict | None) -> None:
        if self.name == "colossalai_gemini":
            model.load_state_dict(model_sd, strict=True)  # fills the bf16 chunks and the fp32 masters
        else:
            inner = self.unwrap(model)
            if self.name == "colossalai_zero2":
                model._force_wait_all_gather()
            with torch.no_grad():
                inner.load_state_dict(model_sd, strict=True)  # casts to the working dtype
            if self.name == "colossalai_zero2":
                self._load_zero_masters(model, model_sd)
        if optimizer is not None and optim_sd:
            optimizer.load_state_dict(optim_sd)


def require_colossalai(purpose: str) -> None:
    """Import colossalai's booster, or raise MissingExtraError naming the extra.

    Imports `colossalai.booster`, not just `colossalai`: a stray `colossalai/` directory on sys.path
    (a namespace package) must not pass for the library. Its import-time chatter about the optional
    tensornvme and apex is silenced.
    """
    from coati_ray.errors import MissingExtraError

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tensornvme.*")
        warnings.filterwarnings("ignore", message=".*apex.*")
        try:
            import colossalai.booster  # noqa: F401  (pulls in the plugins and the shardformer layers)
        except ImportError as e:
            raise MissingExtraError("colossalai", "colossalai", purpose) from e
