"""A group of trainer actors forming one torch.distributed group, with typed methods.

`TrainerGroup(n, ...)` starts `n` Ray actors named `trainer-0..n-1` (so the dashboard reads
well). `TrainerGroup(1, local=True)` runs the same `TrainerWorker` in this process instead,
which is how to debug the loop with a plain Python debugger.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from coati_ray.runtime import get_all, start_actor
from coati_ray.workers.shells import TrainerWorker, worker_class

if TYPE_CHECKING:
    from coati_ray.workers.trainer import SetupInfo, TrainJob

logger = logging.getLogger(__name__)


class TrainerGroup:
    worker_cls: type = TrainerWorker
    method_prefix = ""  # a group living in another group's actors calls its methods by this prefix
    owns_actors = True

    def __init__(self, num_trainers: int, cpus_per_trainer: float = 1.0, gpus_per_trainer: float = 0.0,
                 local: bool = False, name_prefix: str = "trainer", resources: dict[str, float] | None = None,
                 connect: bool = True):
        """Start the ranks' actors; `connect=False` returns before they are up (their processes start
        while the caller starts other roles) and `connect()` then forms the process group."""
        self.n, self.local, self.name_prefix = num_trainers, local, name_prefix
        if local:
            if num_trainers != 1:
                raise ValueError("local (in-process) mode runs exactly one trainer")
            # the worker itself, not its actor class: a debugger (or a test) reads its attributes
            self.workers: list[Any] = [worker_class(self.worker_cls)(0, 1, num_threads=int(cpus_per_trainer))]
            return
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from coati_ray.cluster.placement import reserve_packed, trainer_bundles

        # The ranks go into one PACK placement group: on one node when they fit, so their
        # collectives stay on the node (and a restarted run gets the same shape).
        self.pg = reserve_packed(trainer_bundles(num_trainers, cpus_per_trainer, gpus_per_trainer, resources),
                                 f"the {num_trainers} {name_prefix} ranks")
        self.workers = [start_actor(self.worker_cls, f"{name_prefix}-{rank}",
                                    (rank, num_trainers, max(1, int(cpus_per_trainer))),
                                    cpus_per_trainer, gpus_per_trainer, resources,
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                                        self.pg, placement_group_bundle_index=rank))
                        for rank in range(num_trainers)]
        if connect:
            self.connect()

    @classmethod
    def inside(cls, owner: TrainerGroup, method_prefix: str, name_prefix: str) -> TrainerGroup:
        """A group whose ranks live in `owner`'s actors (rank r in owner's rank r, --colocate all):
        its calls go to `<method_prefix><method>`, it shares the owner's process group, and the
        owner's shutdown ends it."""
        group = cls.__new__(cls)
        group.n, group.local, group.name_prefix, group.workers = owner.n, owner.local, name_prefix, owner.workers
        group.method_prefix, group.owns_actors = method_prefix, False
        return group

    def connect(self) -> None:
        """Wait for the ranks' actors and form their torch.distributed group (rank 0 rendezvous)."""
        if self.local or not self.owns_actors:
            return
        addr, port = get_all([self.workers[0].master_address.remote()], self.labels("master_address")[:1])[0]
        get_all([w.init_process_group.remote(addr, port) for w in self.workers], self.labels("init_process_group"))

    def _call_refs(self, method: str, *args, **kwargs) -> list[Any]:
        """Start `method` on every rank; the ObjectRefs of the results (nothing fetched)."""
        return [getattr(w, self.method_prefix + method).remote(*args, **kwargs) for w in self.workers]

    def _call(self, method: str, *args, **kwargs) -> list[Any]:
        if self.local:
            return [getattr(w, self.method_prefix + method)(*args, **kwargs) for w in self.workers]
        return get_all(self._call_refs(method, *args, **kwargs), self.labels(method))

    def labels(self, method: str) -> list[str]:
        """How each rank's call is named in a watchdog message: `trainer-1.evaluate`."""
        return [f"{self.name_prefix}-{rank}.{method}" for rank in range(self.n)]

    def node_ids(self) -> list[str]:
        return self._call("node_id")

    def dead_ranks(self, timeout_s: float = 10.0) -> list[int]:
        """Ranks whose actor is dead. A call to a dead actor fails at once; a live rank that is
        still blocked in a collective (waiting for the dead one) does not answer in time and
        counts as alive. Every rank is asked at once: at most `timeout_s` in all."""
        import ray

        if self.local:
            return []
        pings = {w.node_id.remote(): rank for rank, w in enumerate(self.workers)}
        answered, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        dead = []
        for ref in answered:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.append(pings[ref])
        return sorted(dead)

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

    def full_state(self) -> tuple[dict, dict]:
        """Rank 0's full (model, optimizer) state dicts."""
        return self._call("full_state")[0]

    def peak_memory_mb(self) -> list[float]:
        return self._call("peak_memory_mb")

    def shutdown(self) -> None:
        if not self.owns_actors:
            return
        if self.local:
            for w in self.workers:
                w.shutdown()
            return
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=10)
        except Exception:  # a dead actor cannot shut down cleanly; killing it is enough
            pass
        for w in self.workers:
            ray.kill(w)
        ray.util.remove_placement_group(self.pg)
