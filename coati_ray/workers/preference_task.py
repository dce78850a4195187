"""Offline preference optimization on the trainer group: DPO, IPO, SimPO, ORPO (pairs) and KTO (unpaired rows).

The formulas are `coati_ray.algos.preference`; this task turns rows into summed response log-probs.

Reference log-probs (DPO, IPO, KTO) are computed once, before training, from the starting model itself
(with LoRA, the base: the adapter disabled) for every train and eval row, and kept with the tokenized
dataset. No reference model is held while training, so DPO costs the policy's memory only; the price is
one forward pass over the data at start, shared by the ranks (rank r scores rows r, r + W, ...; an
all-reduce gives every rank all of them), reported as `SetupInfo.reference_seconds`. A resumed run
computes them again from the starting model (the setup runs before the checkpoint loads), so they never
come from trained weights.

KTO's KL estimate z0 (Ethayarajh et al. 2024, sec. 4.1) uses mismatched pairs: row i's prompt with row
i+1's completion, fixed at tokenization; it is estimated per micro-batch.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from coati_ray.algos import preference as P
from coati_ray.algos.logprobs import log_probs_from_logits
from coati_ray.config import PreferenceArgs
from coati_ray.data import formatting as fmt
from coati_ray.data.loading import pair_schema, unpaired_columns
from coati_ray.models.loading import load_causal_lm
from coati_ray.models.lora import is_peft
from coati_ray.workers.tasks import Datasets, Task


@dataclass
class PrefItem:
    """A pair (chosen, rejected), or a KTO row (completion, mismatched) with `desirable` set."""

    first: fmt.TokenizedSFT
    second: fmt.TokenizedSFT
    desirable: bool | None = None
    ref: tuple[float, float] = (0.0, 0.0)  # reference log-probs of first and second
    row: dict | None = None  # KTO: the row, whose prompt and completion the mismatched pairs reuse


def response_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs over each row's response tokens, their count): (N,), (N,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, T, V)
    labels = batch["labels"][:, 1:]  # (N, T-1): token t is predicted at position t-1
    mask = labels != fmt.IGNORE_INDEX
    lp = log_probs_from_logits(logits[:, :-1], labels.clamp(min=0))  # (N, T-1)
    return (lp * mask).sum(-1), mask.sum(-1).float()


class PreferenceTask(Task):
    stage = "dpo"

    def __init__(self, *args, pref: PreferenceArgs, **kw):
        super().__init__(*args, **kw)
        self.packing = False  # preference batches are padded (their reference pass too); not packed yet
        self.pref, self.beta = pref, pref.resolved_beta()
        self.kto = pref.loss == "kto"
        self.count_name = "rows" if self.kto else "pairs"

    def build_model(self) -> nn.Module:
        return self._maybe_lora(load_causal_lm(self.model_path, self.model_args.model), "causal_lm")

    def columns(self):
        keys = self.data_args.keys()
        return unpaired_columns(keys) if self.kto else pair_schema(keys)

    def tokenize(self, row: dict):
        L = self.data_args.max_len
        if self.kto:
            seq = fmt.tokenize_sft(self.tokenizer, row["prompt"], row["completion"], L)
            return None if seq is None else PrefItem(seq, seq, bool(row["label"]), row=row)
        c = fmt.tokenize_sft(self.tokenizer, row["prompt"], row["chosen"], L)
        r = fmt.tokenize_sft(self.tokenizer, row["prompt"], row["rejected"], L)
        return None if c is None or r is None else PrefItem(c, r)

    def _tokenize_all(self, rows: list[dict]):
        items, dropped = super()._tokenize_all(rows)
        if self.kto and len(items) > 1:  # KTO's mismatched pairs: this prompt, the next kept row's completion
            for i, item in enumerate(items):
                other = items[(i + 1) % len(items)].row["completion"]
                mis = fmt.tokenize_sft(self.tokenizer, item.row["prompt"], other, self.data_args.max_len)
                item.second = mis if mis is not None else item.first
        return items, dropped

    def build_datasets(self) -> Datasets:
        self.datasets = super().build_datasets()
        return self.datasets

    def collate(self, items: list[PrefItem]) -> dict[str, torch.Tensor]:
        seqs = [x.first for x in items] + [x.second for x in items]  # first halves, then second halves
        out = fmt.collate_sft(seqs, self.tokenizer.pad_token_id)  # (2B, T)
        out["ref"] = torch.tensor([x.ref for x in items], dtype=torch.float32)  # (B, 2)
        if self.kto:
            out["desirable"] = torch.tensor([bool(x.desirable) for x in items])  # (B,)
        return out

    def before_training(self, model, worker) -> float:
        """The reference log-probs of every train and eval row (see the module docstring)."""
        if self.pref.loss in P.REFERENCE_FREE:
            return 0.0
        t0 = time.perf_counter()
        items = self.datasets.train + self.datasets.eval
        mine = list(range(worker.rank, len(items), worker.world_size))
        values = [0.0] * (2 * len(items))
        model.to(worker.device).eval()
        frozen = model.disable_adapter() if is_peft(model) else nullcontext()  # the base, no second model
        with torch.no_grad(), frozen, worker._autocast():
            for k in range(0, len(mine), worker.micro):
                idx = mine[k:k + worker.micro]
                batch = {n: v.to(worker.device) for n, v in self.collate([items[i] for i in idx]).items()}
                lp, _ = response_logps(model, batch)
                b = len(idx)
                for j, i in enumerate(idx):
                    values[2 * i], values[2 * i + 1] = float(lp[j]), float(lp[b + j])
        values = worker._all_reduce(values)  # each entry comes from one rank, zeros from the others
        for i, item in enumerate(items):
            item.ref = (values[2 * i], values[2 * i + 1])
        model.train()
        return time.perf_counter() - t0

    def count(self, batch):
        return batch["ref"].shape[0]

    def _terms(self, model, batch) -> dict[str, torch.Tensor]:
        """Per-row loss and rewards of one micro-batch."""
        lp, n = response_logps(model, batch)  # (2B,)
        b = lp.shape[0] // 2
        ref = batch["ref"].to(lp.dtype)
        if self.kto:
            kl = P.kto_kl_estimate(lp[b:], ref[:, 1])
            loss, rewards = P.kto_loss(lp[:b], ref[:, 0], batch["desirable"], kl, self.beta,
                                       self.pref.desirable_weight, self.pref.undesirable_weight)
            return {"loss": loss, "rewards": rewards, "kl": kl.expand(b)}
        pc, pr, lc, lr_ = lp[:b], lp[b:], n[:b], n[b:]
        name = self.pref.loss
        if name == "dpo":
            loss, rc, rr = P.dpo_loss(pc, pr, ref[:, 0], ref[:, 1], self.beta, self.pref.label_smoothing)
        elif name == "ipo":
            loss, rc, rr = P.ipo_loss(pc, pr, ref[:, 0], ref[:, 1], self.beta)
        elif name == "simpo":
            loss, rc, rr = P.simpo_loss(pc, pr, lc, lr_, self.beta, self.pref.gamma)
        else:
            loss, rc, rr, _ = P.orpo_loss(pc, pr, lc, lr_, self.pref.orpo_lambda)
        return {"loss": loss, "chosen": rc, "rejected": rr}

    def _sums(self, t: dict[str, torch.Tensor], batch) -> dict[str, float]:
        if self.kto:
            d = batch["desirable"]
            r = t["rewards"]
            right = torch.where(d, r > 0, r < 0)
            return {"rewards/chosen_sum": float(r[d].sum()), "chosen_n": float(d.sum()),
                    "rewards/rejected_sum": float(r[~d].sum()), "rejected_n": float((~d).sum()),
                    "rewards/accuracy_sum": float(right.sum()), "kl_sum": float(t["kl"].sum())}
        c, r = t["chosen"], t["rejected"]
        return {"rewards/chosen_sum": float(c.sum()), "rewards/rejected_sum": float(r.sum()),
                "rewards/margin_sum": float((c - r).sum()), "rewards/accuracy_sum": float((c > r).sum())}

    def loss(self, model, batch):
        t = self._terms(model, batch)
        sums = self._sums(t, batch)
        if self.kto:  # per-class means need their own counts; the trainer divides by all rows
            sums = {"rewards/signed_sum": float(torch.where(batch["desirable"], t["rewards"], -t["rewards"]).sum()),
                    "kl_sum": sums["kl_sum"], "rewards/accuracy_sum": sums["rewards/accuracy_sum"]}
        return t["loss"].sum(), sums

    def eval_sums(self, model, batch):
        t = self._terms(model, batch)
        return {"loss_sum": float(t["loss"].sum()), "count": float(t["loss"].shape[0]), **self._sums(t, batch)}

    def finish_eval(self, sums):
        n = max(sums["count"], 1.0)
        out = {"eval/loss": sums["loss_sum"] / n, "eval/rewards/accuracy": sums["rewards/accuracy_sum"] / n}
        if self.kto:
            c = sums["rewards/chosen_sum"] / max(sums["chosen_n"], 1.0)
            r = sums["rewards/rejected_sum"] / max(sums["rejected_n"], 1.0)
            out.update({"eval/rewards/chosen": c, "eval/rewards/rejected": r, "eval/rewards/margin": c - r,
                        "eval/kl": sums["kl_sum"] / n})
        else:
            out.update({f"eval/rewards/{k}": sums[f"rewards/{k}_sum"] / n for k in ("chosen", "rejected", "margin")})
        return out
