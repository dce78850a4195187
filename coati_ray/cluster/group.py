"""A group of trainer actors forming one torch.distributed group, with typed methods.

`TrainerGroup(n, ...)` starts `n` Ray actors named `trainer-0..n-1` (so the dashboard reads
well). `TrainerGroup(1, local=True)` runs the same `TrainerWorker` in this process instead,
which is how to debug the loop with a plain Python debugger.
"""

from __future__ import annotations

import logging
from typing import Any

from coati_ray.workers.trainer import SetupInfo, TrainerWorker, TrainJob

logger = logging.getLogger(__name__)


class TrainerGroup:
    def __init__(self, num_trainers: int, cpus_per_trainer: float = 1.0, gpus_per_trainer: float = 0.0,
                 local: bool = False, name_prefix: str = "trainer"):
        self.n, self.local = num_trainers, local
        if local:
            if num_trainers != 1:
                raise ValueError("local (in-process) mode runs exactly one trainer")
            self.workers: list[Any] = [TrainerWorker(0, 1, num_threads=int(cpus_per_trainer))]
            return
        import ray

        remote_cls = ray.remote(TrainerWorker)
        self.workers = []
        for rank in range(num_trainers):
            name = f"{name_prefix}-{rank}"
            try:
                existing = ray.get_actor(name)
            except ValueError:
                existing = None
            if existing is not None:  # a previous run in this namespace left it behind
                ray.kill(existing)
            self.workers.append(remote_cls.options(name=name, num_cpus=cpus_per_trainer, num_gpus=gpus_per_trainer)
                                .remote(rank, num_trainers, max(1, int(cpus_per_trainer))))
        addr, port = ray.get(self.workers[0].master_address.remote())
        ray.get([w.init_process_group.remote(addr, port) for w in self.workers])

    def _call(self, method: str, *args, **kwargs) -> list[Any]:
        if self.local:
            return [getattr(w, method)(*args, **kwargs) for w in self.workers]
        import ray

        from coati_ray.errors import CoatiError

        try:
            return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, CoatiError):  # the user's error, as raised in the actor
                raise e.cause from None
            raise

    # Typed wrappers: every rank runs the method at once (they meet in collectives).
    def setup(self, job: TrainJob) -> SetupInfo:
        return self._call("setup", job)[0]

    def train_step(self) -> dict[str, float]:
        return self._call("train_step")[0]

    def evaluate(self) -> dict[str, float]:
        return self._call("evaluate")[0]

    def save_model(self, path: str, merge_lora: bool = False) -> None:
        self._call("save_model", path, merge_lora)

    def save_checkpoint(self, path: str, extra: dict[str, Any]) -> None:
        self._call("save_checkpoint", path, extra)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        return self._call("load_checkpoint", path)[0]

    def peak_memory_mb(self) -> list[float]:
        return self._call("peak_memory_mb")

    def shutdown(self) -> None:
        if self.local:
            for w in self.workers:
                w.shutdown()
            return
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
        except Exception:  # a dead actor cannot shut down cleanly; killing it is enough
            pass
        for w in self.workers:
            ray.kill(w)
