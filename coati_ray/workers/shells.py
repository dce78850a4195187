"""The Ray actor classes of the roles whose code needs torch, defined without importing torch.

Ray imports an actor's class module in every process that unpickles a handle to it: the driver
(which starts the actors and holds their handles) and the replay buffer (which holds the
generators'). With the workers' own classes that is torch and transformers in both, about 330 MB
of PSS on a one-machine run (bench_peer.py, memory by role). Each class here has the name of the
worker it stands for (so the dashboard, process titles and logs read the same), builds that
worker in its actor's process and forwards every public method to it. A transport's `run(fn)`
hook reaches the worker itself. `tests/unit/test_shells.py` checks that each list below is
its worker's public methods.
"""

from __future__ import annotations

import importlib

RANK = ("barrier", "build_model", "counters", "full_state", "init_process_group", "load_checkpoint",
        "master_address", "node_id", "peak_memory_mb", "restore_counters", "save_checkpoint", "save_model",
        "setup", "shutdown")
GENERATOR = ("load_weights", "log_probs", "node_id", "rollout", "rollouts_done", "run", "sync_check", "sync_gap",
             "tokens_of", "weight_version")
POLICY = (*RANK, "ppo_train", "publish", "run", "score_log_probs")
CRITIC = (*RANK, "prepare", "train_values")
CRITIC_PREFIX = "critic__"  # a hybrid rank's critic methods (workers/hybrid.py)
HYBRID = (*POLICY, *(CRITIC_PREFIX + m for m in CRITIC), "attach_generator", "start_generator",
          *(m for m in GENERATOR if m not in POLICY))


def _forward(name: str):
    def call(self, *args, **kwargs):
        return getattr(self.worker, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _init(self, *args, **kwargs) -> None:
    self.worker = worker_class(type(self))(*args, **kwargs)


def worker_class(cls: type) -> type:
    """The worker class an actor class here stands for (imported now); any other class as it is."""
    if not hasattr(cls, "WORKER"):
        return cls
    module, _, name = cls.WORKER.partition(":")
    return getattr(importlib.import_module(module), name)


def actor_class(worker: str, methods: tuple[str, ...]) -> type:
    """A class named as `worker` ("module:Class") whose actor builds it and forwards `methods` to it."""
    name = worker.partition(":")[2]
    body = {"WORKER": worker, "METHODS": tuple(dict.fromkeys(methods)), "__init__": _init, "__module__": __name__,
            "__qualname__": name, "__doc__": f"Ray actor of `{worker}` (see coati_ray/workers/shells.py)."}
    body.update({m: _forward(m) for m in body["METHODS"]})
    return type(name, (), body)


GeneratorWorker = actor_class("coati_ray.workers.generator:GeneratorWorker", GENERATOR)
ReferenceWorker = actor_class("coati_ray.workers.reference:ReferenceWorker", ("log_probs", "node_id"))
RewardWorker = actor_class("coati_ray.workers.reward:RewardWorker", ("model_score", "node_id", "score"))
PolicyWorker = actor_class("coati_ray.workers.policy:PolicyWorker", POLICY)
CriticWorker = actor_class("coati_ray.workers.critic:CriticWorker", CRITIC)
HybridWorker = actor_class("coati_ray.workers.hybrid:HybridWorker", HYBRID)
TrainerWorker = actor_class("coati_ray.workers.trainer:TrainerWorker", (*RANK, "evaluate", "train_step"))
SHELLS = (GeneratorWorker, ReferenceWorker, RewardWorker, PolicyWorker, CriticWorker, HybridWorker, TrainerWorker)
