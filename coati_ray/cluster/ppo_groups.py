"""The PPO roles as Ray actors, with typed methods (no calling methods by string from the driver).

    generator-i   GeneratorWorker     rollouts (--actors)
    reference-i   ReferenceWorker     KL log-probs (--ref_workers)
    reward-i      RewardWorker        scores (--reward_workers)
    critic-i      CriticWorker        one torch.distributed group (--critic_trainers)
    trainer-i     PolicyWorker        one torch.distributed group (--trainers)
    buffer-0      ReplayBuffer        bounded queue of experience references

With --colocate all, trainer-i is a HybridWorker holding critic rank i and generator-i as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coati_ray.cluster.group import TrainerGroup
from coati_ray.runtime import get_all, get_unwrapped, wait_each
from coati_ray.workers.job import CriticJob, PolicyJob, PolicyTrainOut
from coati_ray.workers.shells import CRITIC_PREFIX, CriticWorker, HybridWorker, PolicyWorker

if TYPE_CHECKING:  # the driver holds these classes' handles without importing torch (workers/shells.py)
    import torch


def _wait_all_get_first(refs: list, labels: list[str]) -> Any:
    """Wait until every rank finished (surfacing errors, bounded by the watchdog), and return rank
    0's ObjectRef unfetched. Any rank's failure surfaces at once (the others may be blocked in a
    collective)."""
    wait_each(refs, labels, skip_first=True)
    return refs[0]


class PolicyGroup(TrainerGroup):
    worker_cls = PolicyWorker

    def start_setup(self, job: PolicyJob) -> list:
        """Every rank loads the policy and builds its optimizer; `get_all(refs)[0]` is rank 0's info."""
        return self._call_refs("setup", job)

    def start_train(self, refs: list, step: int) -> list:
        """Start a PPO update on every rank; `finish_train` collects it (the critic trains meanwhile)."""
        return self._call_refs("ppo_train", refs, step)

    def finish_train(self, futures: list) -> tuple[dict[str, float], list[list[int]], list[int]]:
        outs: list[PolicyTrainOut] = get_all(futures, self.labels("ppo_train"))
        ids = [sorted(i for o in outs for i in o.sample_ids[e]) for e in range(len(outs[0].sample_ids))]
        return outs[0].metrics, ids, outs[0].versions

    def publish(self, version: int) -> Any:
        """ObjectRef of the WeightUpdate for `version` (rank 0's return value, left in the object store)."""
        return _wait_all_get_first(self._call_refs("publish", version), self.labels("publish"))

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port there (for a group the trainers open with others)."""
        return get_unwrapped(self.workers[0].master_address.remote())

    def run_refs(self, fn, *args) -> list:
        """Start `fn(worker, *args)` on every rank (a weight-sync transport's trainer side)."""
        return self._call_refs("run", fn, *args)

    def run(self, fn, *args) -> list:
        return get_all(self.run_refs(fn, *args), self.labels(getattr(fn, "__name__", "run")))

    def run_rank0_ref(self, fn, *args):
        """Start `fn(worker, *args)` on rank 0 only."""
        return self.workers[0].run.remote(fn, *args)

    def score_log_probs(self, exp_ref) -> torch.Tensor:
        """Rank 0's log-probs of the first rows of the experience behind `exp_ref` (read by the actors)."""
        return self._call("score_log_probs", exp_ref)[0]

    def score_log_probs_ref(self, exp_ref) -> Any:
        """The same, left in the object store (its ObjectRef): the sync check hands it to a generator."""
        return _wait_all_get_first(self._call_refs("score_log_probs", exp_ref), self.labels("score_log_probs"))


class CriticGroup(TrainerGroup):
    worker_cls = CriticWorker

    def start_setup(self, job: CriticJob) -> list:
        return self._call_refs("setup", job)

    def prepare(self, refs: list, step: int, kl_coef: float) -> Any:
        """ObjectRef of the step's finished Experience (values, advantages, returns)."""
        return _wait_all_get_first(self._call_refs("prepare", refs, step, kl_coef), self.labels("prepare"))

    def start_train(self, step: int) -> list:
        return self._call_refs("train_values", step)

    def finish_train(self, futures: list) -> dict[str, float]:
        return get_all(futures, self.labels("train_values"))[0]


class HybridGroup(PolicyGroup):
    """The policy ranks of --colocate all: each also holds a critic rank (`critic_group()`) and a
    generator (`start_generators`) in its process (workers/hybrid.py)."""

    worker_cls = HybridWorker

    def start_generators(self, job, scorers: tuple) -> dict[int, Any]:
        """Rank r builds generator-r (prompts, reference, reward); `connect` waits for them. The
        handles are the ranks' actors: the buffer calls their `rollout` like a generator's."""
        self._generators = [w.start_generator.remote(r, job, scorers) for r, w in enumerate(self.workers)]
        return dict(enumerate(self.workers))

    def critic_group(self) -> CriticGroup:
        return CriticGroup.inside(self, CRITIC_PREFIX, "critic")

    def connect(self) -> None:
        super().connect()
        get_all(getattr(self, "_generators", []), [f"generator-{r}.start" for r in range(self.n)])


__all__ = ["CriticGroup", "HybridGroup", "PolicyGroup"]
