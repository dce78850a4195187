"""Critic trainer rank: values for GAE, then clipped value-loss updates on the same experience.

`prepare` runs on every critic rank at once (FSDP needs all ranks in each forward): each rank
computes the values of its share of rows, the shares are summed across ranks, and every rank
computes the same advantages and returns. Rank 0 returns the finished experience, which Ray
keeps in its object store for the policy trainers.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from coati_ray.algos.advantages import ADVANTAGE_ESTIMATORS, masked_whiten
from coati_ray.algos.losses import explained_variance, value_loss
from coati_ray.experience import Experience
from coati_ray.models.heads import token_values
from coati_ray.workers.job import CriticJob
from coati_ray.workers.ppo_common import PPORank


def action_values(model, exp: Experience) -> torch.Tensor:
    """V(s) before each response token: the head at the position that predicts it. -> (B, A)"""
    v = token_values(model, exp.sequences, exp.attention_mask)  # (B, T)
    T, A = exp.sequences.shape[1], exp.num_actions
    return v[:, T - A - 1:T - 1]


class CriticWorker(PPORank):
    lr_role, lr_flag = "critic", "--critic_lr"

    def setup(self, job: CriticJob) -> dict[str, float]:
        self.job = job
        return self._setup_common(job.update, job.tokenizer_path, job.model.dtype, job.packing)

    def build_model(self) -> torch.nn.Module:
        from coati_ray.models.loading import load_tokenizer, load_value_model
        from coati_ray.models.lora import apply_lora

        job = self.job
        torch.manual_seed(job.update.seed)  # a new head (from a causal LM) is the same on every rank
        tok = load_tokenizer(job.critic_path)
        model = load_value_model(job.critic_path, job.model.model, "fp32", pad_token_id=tok.pad_token_id)
        if job.lora:
            model = apply_lora(model, job.lora["rank"], job.lora["alpha"], job.model.lora_dropout,
                               job.lora["target_modules"], "value")
        return model

    @torch.no_grad()
    def prepare(self, refs: list, step: int, kl_coef: float, micro_batch: int = 64) -> Experience | None:
        t0 = time.perf_counter()
        obj = self.job.objective
        exp = self._fetch(refs)
        self.model.eval()
        per = math.ceil(exp.size / self.world_size)
        mine = list(range(self.rank * per, min((self.rank + 1) * per, exp.size)))
        values = torch.zeros(exp.size, exp.num_actions, device=self.device)
        chunks = [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]
        n_max = int(self._all_reduce_max(len(chunks)))
        for i in range(n_max):  # ranks with fewer rows run dummy forwards (FSDP gathers in each one)
            rows = chunks[i] if i < len(chunks) else [0]
            mb = exp.select(rows).to(self.device)
            with self._autocast():
                v = action_values(self.model, mb).float()
            if i < len(chunks):
                values[rows] = v
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
        values = values.cpu() * exp.action_mask
        adv, ret = ADVANTAGE_ESTIMATORS["gae"](exp.score, exp.kl, exp.action_mask, kl_coef, values,
                                               self.job.n_samples_per_prompt, obj.gamma, obj.lam)
        if obj.whiten_advantages:
            adv = masked_whiten(adv, exp.action_mask)
        self._exp = replace(exp, values=values, advantages=adv, returns=ret)
        self._prep_metrics = {"value/explained_variance": explained_variance(values, ret, exp.action_mask),
                              "value/mean": float((values * exp.action_mask).sum() / exp.action_mask.sum()),
                              "returns/mean": float((ret * exp.action_mask).sum() / exp.action_mask.sum()),
                              "timing/critic_values": time.perf_counter() - t0}
        return self._exp if self.rank == 0 else None

    def train_values(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        up, obj, exp = self.update, self.job.objective, self._exp
        self.model.train()
        sums = {"loss": 0.0, "clipped": 0.0, "tokens": 0.0, "grad_norm": 0.0, "updates": 0.0}
        for epoch in range(up.max_epochs):
            for rows in self._minibatches(exp.size, step, epoch):
                mb = exp.select(rows).to(self.device)
                count = self._global_count(mb.action_mask)
                with self._autocast():
                    v = action_values(self.model, mb).float()
                    loss_sum, clipped = value_loss(v, mb.values, mb.returns, mb.action_mask, obj.value_clip)
                self.strategy.backward(loss_sum * self.world_size / count, self.model, self.optimizer)
                sums["grad_norm"] += self.strategy.optimizer_step(self.model, self.optimizer, up.grad_clip)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                sums["updates"] += 1
                sums["loss"] += float(loss_sum.detach())
                sums["clipped"] += float(clipped)
                sums["tokens"] += float(mb.action_mask.sum())
        loss, clipped, tokens = self._all_reduce([sums["loss"], sums["clipped"], sums["tokens"]])
        tokens = max(tokens, 1.0)
        return {**self._prep_metrics, "value/loss": loss / tokens, "value/clipfrac": clipped / tokens,
                "value/grad_norm": sums["grad_norm"] / max(sums["updates"], 1),
                "timing/train_critic": time.perf_counter() - t0}
