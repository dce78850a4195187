"""Shared by the policy and critic trainers: building a PPO trainer rank and its minibatch order."""

from __future__ import annotations

import random

import torch

from coati_ray.engines.strategy import make_strategy
from coati_ray.experience import Experience
from coati_ray.workers.job import UpdateSpec
from coati_ray.workers.rank import RankWorker


class PPORank(RankWorker):
    """A trainer rank of the policy or critic group: its model and optimizer come from an UpdateSpec."""

    stage = "ppo"
    lr_role, lr_flag = "ppo", "--lr"  # the critic's: "critic", "--critic_lr"

    def _setup_common(self, update: UpdateSpec, tokenizer_path: str, dtype: str,
                      packing: bool = False) -> dict[str, float]:
        from transformers import get_constant_schedule

        from coati_ray.models.loading import load_tokenizer

        self.update, self.dtype = update, dtype
        random.seed(update.seed)
        torch.manual_seed(update.seed)
        self._tokenizer = load_tokenizer(tokenizer_path)
        self.strategy = make_strategy(update.strategy, self.device, grad_clip=update.grad_clip, dtype=dtype)
        model = self.build_model()
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        from coati_ray.lr_defaults import lr_and_why

        lr, why = lr_and_why(update.lr, self.lr_role, params, self.lr_flag)
        self.lr = lr
        self.model, self.optimizer = self.strategy.prepare(model, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
        from coati_ray.models.heads import set_packing

        set_packing(self.model, packing)  # --packing: padded experience runs packed (models/heads.py)
        # kept for the checkpoint format
        self.scheduler = get_constant_schedule(self.strategy.schedulable(self.optimizer))
        return {"params": params, "trainable_params": trainable, "lr": lr, "lr_why": why}

    @property
    def tokenizer(self):
        return self._tokenizer

    def _fetch(self, refs: list) -> Experience:
        """The step's experience, read by this rank straight from the object store."""
        import ray

        return Experience.concat(ray.get(refs), self._tokenizer.pad_token_id)

    def _minibatches(self, n: int, step: int, epoch: int) -> list[torch.Tensor]:
        """This rank's rows of every minibatch of one PPO epoch; the same permutation on every rank."""
        tbs = self.update.train_batch_size
        gmb = tbs * self.world_size
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.update.seed * 7 + step * 1000 + epoch))
        return [perm[k * gmb + self.rank * tbs:k * gmb + (self.rank + 1) * tbs] for k in range(n // gmb)]

    def _global_count(self, mask: torch.Tensor) -> float:
        return self._all_reduce([float(mask.sum())])[0]
