"""One rank of a trainer group, whatever it trains: process group, collectives, autocast, and
model / checkpoint I/O. The SFT/RM trainer (`trainer.py`) and the PPO policy and critic
(`policy.py`, `critic.py`) build on it; none inherits another stage's training methods.

A subclass sets `model`, `optimizer`, `scheduler`, `strategy`, `dtype` and `stage` in its setup,
and implements `build_model()` (a fresh unwrapped copy, what saving loads into) and `tokenizer`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from coati_ray.models.lora import is_peft
from coati_ray.runtime import process_group_backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankWorker:
    stage = "train"  # recorded in checkpoints
    dtype = "fp32"  # "bf16": autocast compute

    def __init__(self, rank: int, world_size: int, num_threads: int = 1):
        from coati_ray.runtime import quiet_libraries

        quiet_libraries()
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.step = 0
        self.strategy = None

    def node_id(self) -> str:
        from coati_ray.runtime import current_node_id

        return current_node_id()

    def master_address(self) -> tuple[str, int]:
        """Called on rank 0: an address and free port for the rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def init_process_group(self, addr: str, port: int, backend: str | None = None) -> None:
        if self.world_size == 1 or dist.is_initialized():
            return
        backend = backend or process_group_backend(self.device)
        if not addr.startswith("127."):
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                    world_size=self.world_size)
            return
        # An embedded (one-machine) Ray advertises 127.0.0.1: keep the rendezvous store and gloo's
        # connections on loopback too (c10d's TCPStore and gloo would otherwise listen on every interface).
        if backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        listener = None
        if self.rank == 0:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((addr, port))
            listener.listen(128)
        store = dist.TCPStore(addr, port, self.world_size, is_master=self.rank == 0, wait_for_workers=False,
                              **({"master_listen_fd": listener.fileno()} if listener else {}))
        self._store_listener = listener  # the store serves on this socket: keep it open
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)

    def _autocast(self):
        enabled = self.dtype == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _all_reduce_max(self, x: int) -> float:
        t = torch.tensor([float(x)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def save_model(self, path: str, merge_lora: bool = False) -> None:
        """Write the trained model as an HF directory (rank 0 writes; every rank must call)."""
        model_sd, _ = self.strategy.state_dicts(self.model, None)
        if self.rank == 0:
            with torch.random.fork_rng(devices=[]):  # building must not move the training RNG
                model = self.build_model()  # a plain CPU copy with the same structure
            model.load_state_dict(model_sd)
            if is_peft(model) and merge_lora:
                model = model.merge_and_unload()
            # Write beside, then move file by file: `path` may also hold checkpoints/ and logs.
            out = Path(path)
            tmp = out / ".tmp_model"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
        self.barrier()

    def counters(self) -> dict[str, int]:
        """A subclass's own counters that a resumed run needs (e.g. the PTX data position)."""
        return {}

    def restore_counters(self, meta: dict[str, Any]) -> None:
        """Set the counters `counters()` saved, from a checkpoint's trainer_state.json."""

    def save_checkpoint(self, path: str, extra: dict[str, Any]) -> None:
        """A resumable checkpoint at `path`: model, optimizer, scheduler, step, and every rank's RNG state.

        Sharded strategies (ddp, fsdp) write `shards/` with torch.distributed.checkpoint, each rank
        what it holds, so no rank ever holds the whole optimizer state; the others gather into one
        `state.pt` on rank 0. Written into `path.tmp` and renamed by rank 0 once every rank has
        finished: a save killed midway leaves no directory that `--resume auto` would take (it
        looks for `trainer_state.json`, written last). Every rank must see `path` (one machine, or
        a shared filesystem for a group that spans nodes).
        """
        tmp = Path(path + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        rank_state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                      "scheduler": self.scheduler.state_dict()}
        if self.strategy.sharded_checkpoint:
            import torch.distributed.checkpoint as dcp

            with _single_process_is_meant():
                # no process group (one trainer): dcp runs without collectives (`no_dist` is not in torch 2.5)
                dcp.save(self.strategy.checkpoint_state(self.model, self.optimizer), checkpoint_id=str(tmp / "shards"))
            torch.save(rank_state, tmp / f"rank_{self.rank}.pt")
            layout = "dcp"
        else:
            self._save_gathered(tmp, rank_state)
            layout = "rank0"
        self.barrier()  # every rank's files are complete
        if self.rank == 0:
            meta = {"step": self.step, "world_size": self.world_size, "stage": self.stage, "layout": layout,
                    "strategy": self.strategy.name, **self.counters(), **extra}
            (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
            if Path(path).exists():
                shutil.rmtree(path)
            os.replace(tmp, path)  # the previous checkpoint stays valid until this rename
        self.barrier()

    def _save_gathered(self, tmp: Path, rank_state: dict) -> None:
        model_sd, optim_sd = self.strategy.state_dicts(self.model, self.optimizer)
        rngs: list[Any] = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(rngs, rank_state)
        else:
            rngs = [rank_state]
        if self.rank == 0:
            torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": rank_state["scheduler"],
                        "rng": rngs}, tmp / "state.pt")

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Load a checkpoint written by `save_checkpoint`, under this group's world size (which may
        differ from the writer's: the weights and optimizer state load exactly, each rank's RNG
        stream continues only under the same world size)."""
        ckpt = Path(path)
        meta = json.loads((ckpt / "trainer_state.json").read_text())
        if (ckpt / "shards").is_dir():
            if not self.strategy.sharded_checkpoint:
                from coati_ray.errors import ConfigError

                raise ConfigError("resume", f"{path} was written by --strategy {meta.get('strategy')} (sharded); "
                                  f"--strategy {self.strategy.name} reads only its own rank-0 checkpoints")
            import torch.distributed.checkpoint as dcp

            state = self.strategy.checkpoint_state(self.model, self.optimizer)  # the shapes to fill
            with _single_process_is_meant():
                dcp.load(state, checkpoint_id=str(ckpt / "shards"))
            self.strategy.load_checkpoint_state(self.model, self.optimizer, state)
            own = ckpt / f"rank_{self.rank}.pt"
            rank_state = torch.load(own if own.exists() else ckpt / "rank_0.pt", map_location="cpu",
                                    weights_only=False)
            rngs = {self.rank: rank_state} if own.exists() else {}
            scheduler = rank_state["scheduler"]
        else:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
            self.strategy.load_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
            rngs, scheduler = dict(enumerate(state["rng"])), state["scheduler"]
        self.scheduler.load_state_dict(scheduler)
        self.step = meta["step"]
        self.restore_counters(meta)
        if meta.get("world_size", len(rngs)) == self.world_size and self.rank in rngs:
            random.setstate(rngs[self.rank]["python"])  # same layout: each rank continues its own stream
            torch.set_rng_state(rngs[self.rank]["torch"])
        self.barrier()
        return meta

    def full_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state, full and on CPU on rank 0, empty elsewhere (every rank calls): for checks."""
        return self.strategy.state_dicts(self.model, self.optimizer)

    def peak_memory_mb(self) -> float:
        """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shutdown(self) -> None:
        if getattr(self, "strategy", None) is not None:
            self.strategy.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _single_process_is_meant():
    """torch.distributed.checkpoint warns that it 'assumes' one process when no process group exists:
    a one-trainer group has none, by design (`init_process_group` skips world size 1)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
