"""One process per trainer rank holding every PPO role: `--colocate all` (a hybrid engine).

`HybridWorker` is a policy trainer rank (`PolicyWorker`) that also holds, in the same process,
    - the rank's critic (`CriticWorker`), whose methods the critic group calls as `critic__<name>`,
    - a generator (`GeneratorWorker`) that samples with the trainer's own module: the policy
      weights exist once, and the weight sync is nothing (`coati_ray/sync/shared.py`),
    - the reference and reward models, built inside that generator (as `--colocate rollout` does).
So a one-machine run pays one torch runtime instead of five, and loads no model twice.

Rank r's generator is generator-r (`--actors` equals `--trainers`). The actor runs one call at
a time: phases that separate actors overlap (the critic's update beside the policy's, a rollout
beside training with `--max_staleness`) run one after another here, each on all of the rank's
threads (`--cpus_per_trainer`). The critic ranks share the policy's torch.distributed group: the
driver calls both groups in the same order on every rank, so their collectives never interleave.
"""

from __future__ import annotations

import torch

from coati_ray.workers.critic import CriticWorker
from coati_ray.workers.policy import PolicyWorker
from coati_ray.workers.shells import CRITIC, CRITIC_PREFIX, GENERATOR


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the module it replicates as .module


class HybridWorker(PolicyWorker):
    def __init__(self, rank: int, world_size: int, num_threads: int = 1):
        super().__init__(rank, world_size, num_threads)
        self.critic = CriticWorker(rank, world_size, num_threads)
        self.gen = None  # the GeneratorWorker, once start_generator ran
        self.threads = num_threads

    def start_generator(self, index: int, job, scorers: tuple) -> int:
        """Build generator-`index`'s prompts, tokenizer, reference and reward here; it samples with the
        trainer's module once `attach_generator` ran (after the policy's setup)."""
        from coati_ray.workers.generator import GeneratorWorker

        self.gen = GeneratorWorker(index, job, [], [], self.threads, scorers, share_policy=True)
        return index

    def attach_generator(self, version: int) -> None:
        """The generator samples with this rank's policy module from now on (weights `version`)."""
        from coati_ray.engines.generation import HFBackend

        tok = self.gen.tokenizer
        self.gen.backend = HFBackend(_unwrapped(self.model), tok.eos_token_id, tok.pad_token_id, self.device)
        self.gen.version = version

    def rollout(self, chunk, min_version: int, ticket, kl_coef: float):
        """The generator's rollout on the trainer's current weights (`self.version`, what publish set).

        Sampling seeds torch's global generator (seed, step, chunk): forked, so the trainer's own
        random stream runs as it would in a process of its own."""
        self.gen.version = self.version
        self.model.eval()
        with torch.random.fork_rng(devices=[]):
            return self.gen.rollout(chunk, min_version, ticket, kl_coef)

    def sync_check(self, ticket, exp, rows: int = 2):
        self.gen.version = self.version
        self.model.eval()
        return self.gen.sync_check(ticket, exp, rows)

    def sync_gap(self, ticket, exp, trainer_log_probs):
        self.gen.version = self.version
        self.model.eval()
        return self.gen.sync_gap(ticket, exp, trainer_log_probs)

    def weight_version(self) -> int:
        return self.gen.version if self.gen is not None else 0

    def shutdown(self) -> None:
        self.critic.shutdown()
        super().shutdown()


def _forward(owner: str, name: str):
    def call(self, *args, **kwargs):
        return getattr(getattr(self, owner), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


# The critic group's calls, prefixed; the generator's calls (the buffer's and the sync check's) by
# their own names where the policy trainer has none of that name (`run`, `node_id` are the trainer's).
# The lists are the actor classes' (workers/shells.py), which tests/unit/test_shells.py checks.
for _name in CRITIC:
    setattr(HybridWorker, CRITIC_PREFIX + _name, _forward("critic", _name))
for _name in GENERATOR:
    if not hasattr(HybridWorker, _name):
        setattr(HybridWorker, _name, _forward("gen", _name))
