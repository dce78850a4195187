"""The PPO roles as Ray actors, with typed methods (no calling methods by string from the driver).

    generator-i   GeneratorWorker     rollouts (--actors)
    reference-i   ReferenceWorker     KL log-probs (--ref_workers)
    reward-i      RewardWorker        scores (--reward_workers)
    critic-i      CriticWorker        one torch.distributed group (--critic_trainers)
    trainer-i     PolicyWorker        one torch.distributed group (--trainers)
    buffer-0      ReplayBuffer        bounded queue of experience references
"""

from __future__ import annotations

from typing import Any

import torch

from coati_ray.cluster.group import TrainerGroup
from coati_ray.runtime import get_all, get_unwrapped
from coati_ray.engines.generation import WeightUpdate
from coati_ray.experience import Experience
from coati_ray.workers.critic import CriticWorker
from coati_ray.workers.job import PPOJob
from coati_ray.workers.policy import PolicyTrainOut, PolicyWorker


def _wait_all_get_first(refs: list) -> Any:
    """Wait until every rank finished (surfacing errors), and return rank 0's ObjectRef unfetched."""
    import ray

    left = list(refs)
    while left:  # any rank's failure surfaces at once (the others may be blocked in a collective)
        done, left = ray.wait(left, num_returns=1, fetch_local=False)
        if done[0] is not refs[0]:
            get_unwrapped(done)  # None from the other ranks; raises if one failed
    return refs[0]


class PolicyGroup(TrainerGroup):
    worker_cls = PolicyWorker

    def setup_ppo(self, job: PPOJob) -> dict[str, float]:
        return self._call("setup_ppo", job)[0]

    def start_train(self, refs: list, step: int) -> list:
        """Start a PPO update on every rank; `finish_train` collects it (the critic trains meanwhile)."""
        return self._call_refs("ppo_train", refs, step)

    @staticmethod
    def finish_train(futures: list) -> tuple[dict[str, float], list[list[int]], list[int]]:
        outs: list[PolicyTrainOut] = get_all(futures)
        ids = [sorted(i for o in outs for i in o.sample_ids[e]) for e in range(len(outs[0].sample_ids))]
        return outs[0].metrics, ids, outs[0].versions

    def publish(self, version: int) -> Any:
        """ObjectRef of the WeightUpdate for `version` (rank 0's return value, left in the object store)."""
        return _wait_all_get_first(self._call_refs("publish", version))

    def nccl_connect(self, generators: list, tensor_parallel_sizes: list[int]) -> None:
        """Form the NCCL sync group: trainer rank 0 (sender) and every worker of every engine."""
        import ray

        from coati_ray.engines.vllm_nccl import engine_ranks

        addr, port = ray.get(self.workers[0].master_address.remote())
        offsets, world = engine_ranks(tensor_parallel_sizes)
        get_unwrapped(self._call_refs("nccl_open", addr, port, world)
                      + [g.nccl_connect.remote(addr, port, off, world) for g, off in zip(generators, offsets)])

    def nccl_push(self, version: int, generators: list) -> float:
        """Every rank gathers `version`; rank 0 broadcasts it into every engine. Returns the slowest load (s)."""
        update_info = self._call("nccl_gather", version)[0]
        loads = [g.nccl_receive.remote(version, update_info) for g in generators]
        get_unwrapped(loads + [self.workers[0].nccl_broadcast.remote()])
        return max(get_unwrapped(loads))

    def score_log_probs(self, exp_ref) -> torch.Tensor:
        """Rank 0's log-probs of the first rows of the experience behind `exp_ref` (read by the actors)."""
        return self._call("score_log_probs", exp_ref)[0]


class CriticGroup(TrainerGroup):
    worker_cls = CriticWorker

    def setup_critic(self, job: PPOJob) -> dict[str, float]:
        return self._call("setup_critic", job)[0]

    def prepare(self, refs: list, step: int, kl_coef: float) -> Any:
        """ObjectRef of the step's finished Experience (values, advantages, returns)."""
        return _wait_all_get_first(self._call_refs("prepare", refs, step, kl_coef))

    def start_train(self, step: int) -> list:
        return self._call_refs("train_values", step)


__all__ = ["CriticGroup", "Experience", "PolicyGroup", "WeightUpdate"]
