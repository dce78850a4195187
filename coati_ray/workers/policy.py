"""Policy trainer rank: PPO (+PTX) updates on a step's experience, and weight publishing.

Loss per minibatch (token-mean over the *global* minibatch, see `algos/losses.py`):
    policy = clipped surrogate;  ptx = LM cross-entropy on --pretrain_dataset
    actor loss = (1 - ptx_coef) * policy + ptx_coef * ptx - entropy_coef * entropy
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from coati_ray.algos.advantages import masked_whiten
from coati_ray.algos.losses import combine_actor_loss, entropy_from_logits
from coati_ray.algos.objectives import (
    PolicyLossOut,
    aggregate_count,
    cispo_loss,
    clipped_policy_loss,
    gspo_loss,
    mismatch_metrics,
    tis_weights,
)
from coati_ray.data import formatting as fmt
from coati_ray.engines.generation import WeightUpdate
from coati_ray.models.heads import action_log_probs, forward
from coati_ray.workers.job import PolicyJob, PolicyTrainOut
from coati_ray.workers.ppo_common import PPORank


class PolicyWorker(PPORank):
    def setup(self, job: PolicyJob) -> dict[str, float]:
        self.job = job
        info = self._setup_common(job.update, job.policy_path, job.model.dtype, job.data.packing)
        self.transport_state: dict = {}  # what a weight-sync transport keeps on this rank (coati_ray/sync/)
        self.ptx: list[list[int]] = []
        if job.pretrain_file and job.objective.ptx_coef > 0:
            from coati_ray.data.loading import load_rows, text_columns

            rows = load_rows(job.pretrain_file, text_columns({}), job.data.skip_bad_rows,
                             **job.data.hub_options("pretrain_dataset")).dataset
            texts = (fmt.tokenize_text(self._tokenizer, r["text"], job.data.max_len) for r in rows)
            self.ptx = [ids for ids in texts if len(ids) > 1]
        self.updates = 0  # optimizer steps so far: the PTX data position
        self.version = 0
        return info

    def build_model(self) -> torch.nn.Module:
        from coati_ray.models.loading import load_causal_lm
        from coati_ray.models.lora import apply_lora

        job = self.job
        torch.manual_seed(job.update.seed)  # identical LoRA init on every rank and in the generators
        model = load_causal_lm(job.policy_path, job.model.model, "fp32")
        if job.lora:
            model = apply_lora(model, job.lora["rank"], job.lora["alpha"], job.model.lora_dropout,
                               job.lora["target_modules"], "causal_lm")
        return model

    def counters(self) -> dict[str, int]:
        return {"ptx_updates": self.updates}  # where the PTX data resumes

    def restore_counters(self, meta: dict) -> None:
        self.updates = meta.get("ptx_updates", 0)

    # --- training -----------------------------------------------------------------------------------
    def _ptx_batch(self) -> dict[str, torch.Tensor]:
        tbs, n = self.update.train_batch_size, len(self.ptx)
        start = (self.updates * self.world_size + self.rank) * tbs
        items = [self.ptx[(start + i) % n] for i in range(tbs)]
        ids = fmt.pad_batch(items, self._tokenizer.pad_token_id)
        mask = fmt.pad_batch([[1] * len(x) for x in items], 0)
        labels = ids.masked_fill(mask == 0, fmt.IGNORE_INDEX)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "labels": labels.to(self.device)}

    def ppo_train(self, refs: list, step: int) -> PolicyTrainOut:
        up, obj = self.update, self.job.objective
        t0 = time.perf_counter()
        exp = self._fetch(refs)
        if exp.advantages is None:
            raise RuntimeError("experience reached the policy trainer without advantages")
        if obj.advantage_estimator.startswith("reinforce_pp"):
            # REINFORCE++ whitens over the whole batch (arXiv:2501.03262): the generators whitened
            # their own chunks; here is the step's every chunk (every rank fetched all of them).
            exp = replace(exp, advantages=masked_whiten(exp.returns, exp.action_mask))
        # The trainer's own log-probs of the rollout under the weights that made it, when TIS needs them
        # (the ratio's pi_old is then the trainer's, and the generator/trainer gap goes into the weights).
        train_old = self._rollout_log_probs(exp) if obj.tis_cap is not None else None
        mismatch: dict[str, float] | None = None
        if train_old is not None:
            mismatch = mismatch_metrics(train_old, exp.log_probs, exp.action_mask)
        self.model.train()
        use_ptx = bool(self.ptx) and obj.ptx_coef > 0
        agg = obj.aggregation()
        sums = {k: 0.0 for k in ("pg", "clipped", "approx_kl", "entropy", "ptx", "tokens", "grad_norm", "updates",
                                 "tis_clipped", "tis_units")}
        ids_per_epoch: list[list[int]] = []
        for epoch in range(up.max_epochs):
            ids: list[int] = []
            for rows in self._minibatches(exp.size, step, epoch):
                mb = exp.select(rows).to(self.device)
                count = self._global_count(mb.action_mask)
                denominator = self._all_reduce([float(aggregate_count(mb.action_mask, agg))])[0]
                with self._autocast():
                    lp, logits = action_log_probs(self.model, mb.sequences, mb.attention_mask, mb.num_actions,
                                                  self.job.temperature, return_logits=True)
                    if mismatch is None:  # no update of this step yet: lp is the trainer's pi_old on these rows
                        mismatch = mismatch_metrics(lp.detach(), mb.log_probs, mb.action_mask)
                    old, weights = mb.log_probs, None
                    if train_old is not None:
                        old = train_old[rows].to(self.device)
                        weights, tis_frac = tis_weights(old, mb.log_probs, mb.action_mask, obj.tis_cap, obj.tis_level)
                        units = float(mb.action_mask.sum()) if obj.tis_level == "token" else float(len(rows))
                        sums["tis_clipped"] += float(tis_frac) * units
                        sums["tis_units"] += units
                    out = self._policy_loss(lp, old, mb.advantages, mb.action_mask, weights)
                    # DDP/FSDP average over ranks; we want the loss over the global minibatch
                    scale = self.world_size / max(denominator, 1.0)
                    token_scale = self.world_size / count  # the entropy bonus stays a token mean
                    ent_sum = None
                    if obj.entropy_coef:
                        ent_sum = (entropy_from_logits(logits) * mb.action_mask).sum()
                    ptx = None
                    if use_ptx:
                        b = self._ptx_batch()
                        lg = forward(self.model, b["input_ids"], b["attention_mask"]).logits[:, :-1].float()
                        labels = b["labels"][:, 1:]
                        ptx_count = self._global_count(labels != fmt.IGNORE_INDEX)
                        ptx_sum = F.cross_entropy(lg.flatten(0, 1), labels.flatten(), ignore_index=fmt.IGNORE_INDEX,
                                                  reduction="sum")
                        ptx = ptx_sum * self.world_size / ptx_count
                        sums["ptx"] += float(ptx_sum.detach()) / ptx_count
                    loss = combine_actor_loss(out.loss_sum * scale, ptx, obj.ptx_coef,
                                              None if ent_sum is None else ent_sum * token_scale, obj.entropy_coef)
                self.strategy.backward(loss, self.model, self.optimizer)
                sums["grad_norm"] += self.strategy.optimizer_step(self.model, self.optimizer, up.grad_clip)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.updates += 1
                sums["updates"] += 1
                sums["pg"] += float(out.loss_sum.detach()) * count / max(denominator, 1.0)  # token-weighted
                sums["clipped"] += float(out.clipped)
                sums["approx_kl"] += float(out.approx_kl_sum)
                sums["tokens"] += float(mb.action_mask.sum())
                if ent_sum is not None:
                    sums["entropy"] += float(ent_sum.detach())
                ids += mb.sample_ids.tolist()
            ids_per_epoch.append(ids)
        keys = ["pg", "clipped", "approx_kl", "entropy", "tokens", "tis_clipped", "tis_units"]
        red = dict(zip(keys, self._all_reduce([sums[k] for k in keys])))
        n_up = max(sums["updates"], 1)
        tok = max(red["tokens"], 1.0)
        metrics = {"policy/loss": red["pg"] / tok, "policy/clipfrac": red["clipped"] / tok,
                   "policy/approx_kl": red["approx_kl"] / tok, "policy/grad_norm": sums["grad_norm"] / n_up,
                   "policy/lr": self.scheduler.get_last_lr()[0], "policy/updates": n_up,
                   "timing/train_policy": time.perf_counter() - t0}
        if obj.entropy_coef:
            metrics["policy/entropy"] = red["entropy"] / tok
        if mismatch is not None:  # generator vs trainer log-probs of the same tokens (this rank's rows)
            metrics.update({"rollout/gen_train_kl": mismatch["gen_train_kl"],
                            "rollout/logprob_diff_max": mismatch["max_abs_logprob_diff"],
                            "rollout/logprob_diff_mean": mismatch["mean_abs_logprob_diff"]})
        if train_old is not None:
            metrics["tis/clip_fraction"] = red["tis_clipped"] / max(red["tis_units"], 1.0)
        if use_ptx:
            metrics["ptx/loss"] = self._all_reduce([sums["ptx"]])[0] / n_up  # per-update global means, averaged
        return PolicyTrainOut(metrics, ids_per_epoch, exp.versions.tolist())

    def _policy_loss(self, lp, old, adv, mask, weights) -> PolicyLossOut:
        """--policy_loss with its clip range and --loss_agg (algos/objectives.py)."""
        obj = self.job.objective
        low, high = obj.clip_range()
        common = {"agg": obj.aggregation(), "norm_len": float(self.job.max_new_tokens), "weights": weights}
        if obj.policy_loss == "gspo":
            return gspo_loss(lp, old, adv, mask, low, high, **common)
        if obj.policy_loss == "cispo":
            return cispo_loss(lp, old, adv, mask, eps_high=high, eps_low=low, **common)
        return clipped_policy_loss(lp, old, adv, mask, obj.eps_clip, eps_clip_low=low, eps_clip_high=high, **common)

    @torch.no_grad()
    def _rollout_log_probs(self, exp, micro_batch: int = 32) -> torch.Tensor:
        """(B, A) this rank's log-probs of the rollout's tokens under its current weights (before the update)."""
        self.model.eval()
        out = []
        for start in range(0, exp.size, micro_batch):
            e = exp.select(list(range(start, min(start + micro_batch, exp.size)))).to(self.device)
            with self._autocast():
                out.append((action_log_probs(self.model, e.sequences, e.attention_mask, e.num_actions,
                                             self.job.temperature) * e.action_mask).float().cpu())
        return torch.cat(out)

    # --- weights ------------------------------------------------------------------------------------
    def publish(self, version: int) -> WeightUpdate | None:
        """Gather the full weights (every rank takes part); rank 0 returns them as one update.

        A transport sends it on (coati_ray/sync/); through the object store, the return value is the
        object in Ray's store, which every generator reads directly. With LoRA only the adapter
        tensors are shipped.
        """
        sd, _ = self.strategy.state_dicts(self.model, None)
        self.version = version
        if self.rank != 0:
            return None
        if self.job.lora:
            sd = {k: v for k, v in sd.items() if "lora_" in k}
        return WeightUpdate(version, sd, adapter_only=bool(self.job.lora))

    def run(self, fn, *args):
        """`fn(self, *args)` on this rank: a weight-sync transport's trainer side (coati_ray/sync/)."""
        return fn(self, *args)

    @torch.no_grad()
    def score_log_probs(self, exp, rows: int = 2) -> torch.Tensor:
        """The trainer's log-probs of the first `rows` of `exp`, 0 past each response's end
        (every rank takes part; for sync checks)."""
        self.model.eval()
        e = exp.select(list(range(min(rows, exp.size)))).to(self.device)
        return (action_log_probs(self.model, e.sequences, e.attention_mask, e.num_actions,
                                 self.job.temperature) * e.action_mask).cpu()
