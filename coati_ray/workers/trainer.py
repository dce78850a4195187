"""The trainer worker: one rank of a data-parallel group running the SFT or RM loop.

The driver calls `train_step()` once per optimizer step on every rank at once; each rank reads
its own slice of the global batch, so no training data passes through the driver.

Global batch layout (G = batch_size x accumulation_steps x world_size samples per step): the
epoch's seeded permutation is cut into G-sized steps; micro-batch j of rank r takes slot
j * world_size + r. One trainer with 2x accumulation therefore sees exactly the samples that two
trainers see, and with loss normalised by the global count the two give the same update.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch

from coati_ray.config import (
    FileDataArgs,
    ModelArgs,
    PreferenceArgs,
    RMArgs,
    TrainArgs,
)
from coati_ray.engines.strategy import make_strategy
from coati_ray.lr_defaults import lr_and_why
from coati_ray.workers.rank import RankWorker
from coati_ray.workers.tasks import RMTask, SFTTask, Task

logger = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """Everything a trainer rank needs; built by the pipeline, pickled to each actor."""

    stage: str  # "sft" | "rm"
    model_path: str
    train_file: str
    eval_file: str | None
    model: ModelArgs
    data: FileDataArgs  # SFTDataArgs (sft) or PairDataArgs (rm)
    train: TrainArgs
    rm: RMArgs | None = None
    pref: PreferenceArgs | None = None  # stage "dpo"


@dataclass
class SetupInfo:
    n_train: int
    n_eval: int
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    params: int
    trainable_params: int
    skipped_rows: list[str]
    dropped_samples: int
    lr: float
    lr_why: str  # the flag, or the default for the model's size (coati_ray/lr_defaults.py)
    reference_seconds: float = 0.0  # the reference log-prob pass before training (stage "dpo")
    padding: str = ""  # share of padded positions in the first epoch's micro-batches, padded and packed


class TrainerWorker(RankWorker):
    # --- process group ------------------------------------------------------------------------
    # --- setup ----------------------------------------------------------------------------------
    def setup(self, job: TrainJob) -> SetupInfo:
        self.job, ta = job, job.train
        self.stage, self.dtype = job.stage, job.model.dtype
        random.seed(ta.seed)
        torch.manual_seed(ta.seed)
        if job.stage == "dpo":
            from coati_ray.workers.preference_task import PreferenceTask

            task_cls, kw = PreferenceTask, {"pref": job.pref}
        else:
            task_cls = SFTTask if job.stage == "sft" else RMTask
            kw = {"rm_args": job.rm} if job.stage == "rm" else {}
        self.task: Task = task_cls(job.model_path, job.model, job.data, job.train_file, job.eval_file, ta.seed, **kw)
        self.data = self.task.build_datasets()
        self.strategy = make_strategy(ta.strategy, self.device, grad_clip=ta.grad_clip,
                                      accumulation_steps=ta.accumulation_steps, dtype=job.model.dtype)
        self.micro = ta.batch_size
        model = self.task.build_model()
        t_ref = self.task.before_training(model, self)
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.lr, lr_why = lr_and_why(ta.lr, job.stage, params)
        self.model, self.optimizer = self.strategy.prepare(model, lr=self.lr, weight_decay=ta.weight_decay,
                                                           betas=(ta.adam_beta1, ta.adam_beta2))
        self.global_batch = ta.batch_size * ta.accumulation_steps * self.world_size
        self.steps_per_epoch = len(self.data.train) // self.global_batch
        if self.steps_per_epoch == 0:
            from coati_ray.errors import ConfigError

            raise ConfigError("batch_size", f"the global batch ({ta.batch_size} x {ta.accumulation_steps} "
                              f"accumulation x {self.world_size} trainers = {self.global_batch}) is larger than "
                              f"the {len(self.data.train)} training samples")
        self.total_steps = self.steps_per_epoch * ta.max_epochs
        if ta.max_steps:
            self.total_steps = min(self.total_steps, ta.max_steps)
        from transformers import get_cosine_schedule_with_warmup

        warmup = math.ceil(ta.warmup_ratio * self.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.strategy.schedulable(self.optimizer), warmup,
                                                         self.total_steps)
        padding = "" if job.stage == "dpo" else self.task.padding_report(
            [[self.data.train[i] for i in mb] for s in range(self.steps_per_epoch) for mb in self._micro_batches(s)])
        return SetupInfo(len(self.data.train), len(self.data.eval), self.steps_per_epoch, self.total_steps,
                         self.global_batch, params, trainable, self.data.skipped, self.data.dropped, self.lr, lr_why,
                         t_ref, padding)

    # --- training -------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        """The epoch's sample order: a function of (seed, epoch) only, so resuming needs no state."""
        if getattr(self, "_order", (None,))[0] != epoch:
            idx = list(range(len(self.data.train)))
            random.Random(self.job.train.seed * 1000 + epoch).shuffle(idx)
            self._order = (epoch, idx)
        return self._order[1]

    def _micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]
        out = []
        for j in range(self.job.train.accumulation_steps):
            slot = j * self.world_size + self.rank
            out.append(order[slot * self.micro:(slot + 1) * self.micro])
        return out

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; metrics are the same on every rank."""
        t0 = time.perf_counter()
        self.model.train()
        batches = [self.task.collate([self.data.train[i] for i in mb]) for mb in self._micro_batches(self.step)]
        counts = [self.task.count(b) for b in batches]
        global_count, = self._all_reduce([float(sum(counts))])
        loss_sum, extras, tokens = 0.0, {}, 0
        for j, batch in enumerate(batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            last = j == len(batches) - 1
            with self.strategy.no_sync(self.model, sync=last, optimizer=self.optimizer), self._autocast():
                s, extra = self.task.loss(self.model, batch)
                # x world_size: DDP/FSDP average gradients over ranks, we want the global-count mean.
                self.strategy.backward(s * (self.world_size / global_count), self.model, self.optimizer)
            loss_sum += float(s.detach())
            tokens += int(batch.get("tokens_mask", batch["attention_mask"]).sum())  # packed: a 4-D mask
            for k, v in extra.items():
                extras[k] = extras.get(k, 0.0) + v
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.strategy.optimizer_step(self.model, self.optimizer, self.job.train.grad_clip)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        keys = sorted(extras)
        reduced = self._all_reduce([loss_sum, float(tokens)] + [extras[k] for k in keys])
        elapsed = time.perf_counter() - t0
        metrics = {"train/loss": reduced[0] / global_count, "train/lr": lr, "train/grad_norm": grad_norm,
                   "perf/tokens_per_s": reduced[1] / elapsed, "perf/step_time": elapsed, "train/step": self.step}
        for k, v in zip(keys, reduced[2:]):
            metrics[f"train/{k.removesuffix('_sum')}"] = v / global_count
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.data.eval:  # the same on every rank: no collective is started
            return {}
        self.model.eval()
        items = self.data.eval[self.rank::self.world_size]
        # The ranks meet in collectives inside each forward (FSDP's all-gather, DDP's buffer
        # broadcast), so every rank runs the same number of forwards, in the same order relative to
        # the all-reduces: agree on the count first; a rank with fewer eval batches (or none, when
        # the eval set is smaller than the world) runs dummy ones whose results are discarded.
        n_local = math.ceil(len(items) / self.micro)
        n_max = int(self._all_reduce_max(n_local))
        sums: dict[str, float] = {}
        for i in range(n_max):
            real = i < n_local
            rows = items[i * self.micro:(i + 1) * self.micro] if real else self.data.eval[:1]
            batch = {k: v.to(self.device) for k, v in self.task.collate(rows).items()}
            with self._autocast():
                for k, v in self.task.eval_sums(self.model, batch).items():
                    sums[k] = sums.get(k, 0.0) + (v if real else 0.0)  # every rank has the same keys
        keys = ["loss_sum", "count"] + sorted(k for k in sums if k not in ("loss_sum", "count"))
        reduced = self._all_reduce([sums.get(k, 0.0) for k in keys])
        return self.task.finish_eval(dict(zip(keys, reduced)))

    # --- saving ---------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """A fresh, unwrapped copy of the trained model's structure (what saving loads into)."""
        return self.task.build_model()

    @property
    def tokenizer(self):
        return self.task.tokenizer

