"""What the trainer trains: the SFT and reward-model tasks.

A task builds its model and datasets and computes a *summed* loss over a micro-batch plus the
count it should be divided by (response tokens for SFT, pairs for the RM). The trainer divides
by the count over the whole global batch, so accumulation and data parallelism give exactly the
gradient of the full batch (the gradient-accumulation normalisation bug fixed in transformers
4.46 came from averaging per-micro-batch means instead).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coati_ray.algos.rm_loss import RM_LOSSES
from coati_ray.config import FileDataArgs, ModelArgs, RMArgs
from coati_ray.data import formatting as fmt
from coati_ray.data.conversations import ChatError
from coati_ray.data.loading import load_rows, pair_schema, sft_schema
from coati_ray.data.packing import can_pack, model_can_pack, pack, padding_stats
from coati_ray.errors import DataError
from coati_ray.models.heads import sequence_reward, token_values
from coati_ray.models.loading import load_causal_lm, load_tokenizer, load_value_model
from coati_ray.models.lora import apply_lora

logger = logging.getLogger(__name__)


@dataclass
class Datasets:
    train: list[Any]
    eval: list[Any]
    skipped: list[str] = field(default_factory=list)  # bad rows skipped (with --skip_bad_rows)
    dropped: int = 0  # samples with no response token left after truncation


def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = int(len(rows) * fraction)
    return [rows[i] for i in idx[n_eval:]], [rows[i] for i in idx[:n_eval]]


class Task:
    stage: str
    count_name: str  # what the loss is averaged over

    def __init__(self, model_path: str, model_args: ModelArgs, data_args: FileDataArgs, train_file: str,
                 eval_file: str | None, seed: int):
        self.model_path, self.model_args, self.data_args = model_path, model_args, data_args
        self.train_file, self.eval_file, self.seed = train_file, eval_file, seed
        self.tokenizer = load_tokenizer(model_path)
        # padding-free packing (coati_ray/data/packing.py) where the model family takes it
        self.packing = getattr(data_args, "packing", False) and can_pack(self._model_type())

    def _model_type(self) -> str | None:
        from coati_ray.models.loading import load_config

        return getattr(load_config(self.model_path), "model_type", None)

    def lengths(self, item: Any) -> list[int]:
        """The lengths of the sequences an item contributes to a micro-batch."""
        return [len(item.input_ids)]

    def _row_tokens(self, items: list[Any]) -> int:
        """Packed rows' width: --max_len, or the longest sequence when one is longer."""
        return max(self.data_args.max_len, *(n for it in items for n in self.lengths(it)))

    def padding_report(self, micro_batches: list[list[Any]]) -> str:
        """'padding 61% of positions -> 3% packed' over the given micro-batches (for the start-up log)."""
        lengths = [[n for it in mb for n in self.lengths(it)] for mb in micro_batches if mb]
        stats = [padding_stats(mb, max(self.data_args.max_len, max(mb))) for mb in lengths]
        real = sum(s.real for s in stats)
        padded, packed = sum(s.padded for s in stats), sum(s.packed for s in stats)
        if not self.packing:
            return f"padding {1 - real / max(padded, 1):.0%} of positions (not packed)"
        return (f"padding {1 - real / max(padded, 1):.0%} of positions -> {1 - real / max(packed, 1):.0%} packed "
                f"({padded / max(packed, 1):.2f}x fewer positions)")

    # --- to implement -------------------------------------------------------------------------
    def build_model(self) -> nn.Module: ...
    def before_training(self, model: nn.Module, worker) -> float:
        """Work on the untrained model before the strategy wraps it (e.g. reference log-probs) on the
        trainer rank `worker`; returns the seconds it took."""
        return 0.0

    def columns(self): ...
    def tokenize(self, row: dict) -> Any: ...
    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]: ...
    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the summed loss of this micro-batch is divided by (before the forward pass)."""
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss, summed extra metrics) for one micro-batch."""
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]: ...
    def finish_eval(self, sums: dict[str, float]) -> dict[str, float]: ...

    # --- shared -------------------------------------------------------------------------------
    def build_datasets(self) -> Datasets:
        da = self.data_args
        train = load_rows(self.train_file, self.columns(), da.skip_bad_rows, da.max_samples,
                          **da.hub_options("dataset"))
        rows, skipped = list(train.dataset), list(train.skipped)
        if self.eval_file:
            ev = load_rows(self.eval_file, self.columns(), da.skip_bad_rows, **da.hub_options("eval_dataset"))
            eval_rows = list(ev.dataset)
            skipped += ev.skipped
        else:
            rows, eval_rows = _split(rows, da.eval_split, self.seed)
        train_items, dropped = self._tokenize_all(rows)
        eval_items, _ = self._tokenize_all(eval_rows)
        if not train_items:
            raise DataError(self.train_file, f"no sample has a response token left after --max_len {da.max_len} "
                            "truncation; raise --max_len")
        return Datasets(train_items, eval_items, skipped, dropped)

    def _tokenize_all(self, rows: list[dict]) -> tuple[list[Any], int]:
        items, dropped = [], 0
        self.fallbacks = 0
        for r in rows:
            try:
                item = self.tokenize(r)
            except ChatError as e:  # rendering (e.g. a multi-turn row and a tokenizer without a chat template)
                raise DataError(self.train_file, str(e)) from None
            if item is None:
                dropped += 1
            else:
                items.append(item)
        if dropped:
            logger.warning("%d samples had no response token left after truncation to %d tokens and were dropped",
                           dropped, self.data_args.max_len)
        if self.fallbacks:
            logger.warning("%d of %d conversations are trained on their last assistant turn only: the chat template "
                           "renders earlier turns differently once later ones follow (e.g. it drops earlier thinking), "
                           "so their masks could not be found by prefix", self.fallbacks, len(rows))
        return items, dropped

    def _maybe_lora(self, model: nn.Module, kind: str) -> nn.Module:
        ma = self.model_args
        if ma.lora_rank > 0:
            model = apply_lora(model, ma.lora_rank, ma.lora_alpha, ma.lora_dropout, ma.lora_target_modules, kind)
        return model


class SFTTask(Task):
    stage = "sft"
    count_name = "tokens"

    def build_model(self) -> nn.Module:
        model = load_causal_lm(self.model_path, self.model_args.model)
        self.packing = self.packing and model_can_pack(model)  # the attention it loaded with takes it
        return self._maybe_lora(model, "causal_lm")

    def columns(self):
        return sft_schema(self.data_args.keys())

    def tokenize(self, row: dict):
        if row.get("messages"):
            item, fallback = fmt.tokenize_conversation(self.tokenizer, row["messages"], self.data_args.max_len,
                                                       self.data_args.train_on)
            self.fallbacks += fallback
            return item
        prompt = fmt.instruction_prompt(row["instruction"], row["input"])
        return fmt.tokenize_sft(self.tokenizer, prompt, row["output"], self.data_args.max_len)

    def collate(self, items):
        if self.packing:
            return pack([x.input_ids for x in items], self.tokenizer.pad_token_id, self._row_tokens(items),
                        labels=[x.labels for x in items])
        return fmt.collate_sft(items, self.tokenizer.pad_token_id)

    def _token_nll(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits  # (B, T, V)
        labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from position t-1
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), reduction="none",
                              ignore_index=fmt.IGNORE_INDEX)
        return nll, (labels.flatten() != fmt.IGNORE_INDEX)

    def count(self, batch):
        return int((batch["labels"][:, 1:] != fmt.IGNORE_INDEX).sum())  # response tokens that are predicted

    def loss(self, model, batch):
        nll, _ = self._token_nll(model, batch)
        return nll.sum(), {}

    def eval_sums(self, model, batch):
        nll, mask = self._token_nll(model, batch)
        return {"loss_sum": float(nll.sum()), "count": float(mask.sum())}

    def finish_eval(self, sums):
        return {"eval/loss": sums["loss_sum"] / max(sums["count"], 1.0)}


class RMTask(Task):
    stage = "rm"
    count_name = "pairs"

    def __init__(self, *args, rm_args: RMArgs, **kw):
        super().__init__(*args, **kw)
        self.loss_fn = RM_LOSSES[rm_args.loss_fn]

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # the new scalar head must be identical on every rank
        model = load_value_model(self.model_path, self.model_args.model, pad_token_id=self.tokenizer.pad_token_id)
        self.packing = self.packing and model_can_pack(model)  # the attention it loaded with takes it
        return self._maybe_lora(model, "value")

    def columns(self):
        return pair_schema(self.data_args.keys())

    def tokenize(self, row: dict):
        return fmt.tokenize_pair(self.tokenizer, row["prompt"], row["chosen"], row["rejected"], self.data_args.max_len)

    def lengths(self, item) -> list[int]:
        return [len(item.chosen), len(item.rejected)]

    def collate(self, items):
        if self.packing:  # chosen first, then rejected, as collate_pairs orders them
            seqs = [x.chosen for x in items] + [x.rejected for x in items]
            return pack(seqs, self.tokenizer.pad_token_id, self._row_tokens(items))
        return fmt.collate_pairs(items, self.tokenizer.pad_token_id)

    def _rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "seq_end" in batch:  # packed: the head's output at each sequence's last token
            values = token_values(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            r = values[batch["seq_row"], batch["seq_end"]]  # (2B,)
        else:
            r = sequence_reward(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
        b = r.shape[0] // 2
        return r[:b], r[b:]

    def count(self, batch):
        if "seq_row" in batch:  # packed: rows hold several sequences
            return batch["seq_row"].shape[0] // 2
        return batch["input_ids"].shape[0] // 2  # pairs: chosen rows first, then rejected

    def loss(self, model, batch):
        chosen, rejected = self._rewards(model, batch)
        per_pair = self.loss_fn(chosen, rejected)  # (B,)
        c, r = chosen.detach(), rejected.detach()
        return per_pair.sum(), {"acc_sum": float((c > r).sum()), "margin_sum": float((c - r).sum())}

    def eval_sums(self, model, batch):
        chosen, rejected = self._rewards(model, batch)
        return {"loss_sum": float(self.loss_fn(chosen, rejected).sum()), "count": float(chosen.shape[0]),
                "acc_sum": float((chosen > rejected).sum()), "margin_sum": float((chosen - rejected).sum())}

    def finish_eval(self, sums):
        n = max(sums["count"], 1.0)
        return {"eval/loss": sums["loss_sum"] / n, "eval/accuracy": sums["acc_sum"] / n,
                "eval/margin": sums["margin_sum"] / n}
