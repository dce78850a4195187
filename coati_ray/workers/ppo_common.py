"""Shared by the policy and critic trainers: building a PPO trainer rank and its minibatch order."""

from __future__ import annotations

import random

import torch

from coati_ray.engines.strategy import make_strategy
from coati_ray.experience import Experience
from coati_ray.workers.job import PPOJob
from coati_ray.workers.trainer import TrainerWorker


class PPOTrainerBase(TrainerWorker):
    """A TrainerWorker whose model, optimizer and data come from a PPOJob instead of a TrainJob."""

    def _setup_common(self, job: PPOJob, lr: float) -> dict[str, float]:
        from transformers import get_constant_schedule

        from coati_ray.models.loading import load_tokenizer

        self.job, ppo = job, job.ppo
        random.seed(ppo.seed)
        torch.manual_seed(ppo.seed)
        self._tokenizer = load_tokenizer(job.policy_path)
        self.strategy = make_strategy(ppo.strategy, self.device, grad_clip=ppo.grad_clip, dtype=job.model.dtype)
        model = self.build_model()
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.lr = lr
        self.model, self.optimizer = self.strategy.prepare(model, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
        # kept for the checkpoint format
        self.scheduler = get_constant_schedule(self.strategy.schedulable(self.optimizer))
        return {"params": params, "trainable_params": trainable, "lr": lr}

    @property
    def tokenizer(self):
        return self._tokenizer

    def _fetch(self, refs: list) -> Experience:
        """The step's experience, read by this rank straight from the object store."""
        import ray

        return Experience.concat(ray.get(refs), self._tokenizer.pad_token_id)

    def _minibatches(self, n: int, step: int, epoch: int) -> list[torch.Tensor]:
        """This rank's rows of every minibatch of one PPO epoch; the same permutation on every rank."""
        tbs = self.job.ppo.train_batch_size
        gmb = tbs * self.world_size
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.job.ppo.seed * 7 + step * 1000 + epoch))
        return [perm[k * gmb + self.rank * tbs:k * gmb + (self.rank + 1) * tbs] for k in range(n // gmb)]

    def _global_count(self, mask: torch.Tensor) -> float:
        return self._all_reduce([float(mask.sum())])[0]
