"""Config dataclasses, one per concern, each field with its help text; validated once at the edge.

`transformers.HfArgumentParser` turns them into flags (see `coati_ray/cli.py`). The seed's flag
names (`--pretrain`, `--model`, `--strategy`, `--save_path`, `--dataset`, `--batch_size`,
`--accumulation_steps`, `--lr`, `--log_interval`, `--lora_rank`, ...) are the field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from coati_ray.errors import ConfigError

STRATEGIES = ("ddp", "fsdp", "colossalai_zero2", "colossalai_gemini")
Strategy = Literal["ddp", "fsdp", "colossalai_zero2", "colossalai_gemini"]
PRESET_LR = 1e-3  # a randomly initialised tiny model learns at this rate
PRETRAINED_LR = 5e-6  # ColossalChat's default for real pretrained models


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelArgs:
    pretrain: Optional[str] = _help("HF model directory to start from; default: the embedded tiny preset "
                                    "of --model (built on first use).", default=None)
    model: Literal["auto", "llama", "gpt2", "opt", "bloom"] = _help(
        "Model family; checked against the checkpoint ('auto' accepts any). Picks the preset when "
        "--pretrain is not given (auto = llama).", default="auto")
    preset_size: Literal["tiny", "micro"] = _help("Size of the embedded preset: tiny (~4M params) or micro "
                                                  "(~0.2M, for tests).", default="tiny")
    dtype: Literal["fp32", "bf16"] = _help("Compute precision. bf16 runs matmuls under autocast and keeps "
                                           "fp32 master weights and optimizer state.", default="fp32")
    lora_rank: int = _help("LoRA rank; 0 trains all parameters.", default=0)
    lora_alpha: float = _help("LoRA alpha (scale = alpha / rank).", default=16.0)
    lora_dropout: float = _help("Dropout on the LoRA branch.", default=0.0)
    lora_target_modules: str = _help("'all-linear' or comma-separated module names (e.g. q_proj,v_proj).",
                                     default="all-linear")
    merge_lora: bool = _help("Merge LoRA adapters into the base weights when saving (else save the "
                             "adapter only).", default=False)

    def validate(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError("lora_rank", f"must be >= 0, got {self.lora_rank}")
        if self.lora_rank and self.lora_alpha <= 0:
            raise ConfigError("lora_alpha", f"must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataArgs:
    dataset: Optional[str] = _help("Training data file (.json/.jsonl/.csv/.tsv/.parquet) or saved dataset "
                                   "directory; default: the demo data.", default=None)
    eval_dataset: Optional[str] = _help("Held-out data; default: the demo eval split (or --eval_split of "
                                        "--dataset when --dataset is given).", default=None)
    eval_split: float = _help("Fraction of --dataset held out for evaluation when --eval_dataset is not "
                              "given.", default=0.05)
    max_len: int = _help("Truncate tokenized samples to this many tokens.", default=512)
    max_samples: Optional[int] = _help("Use at most this many training rows.", default=None)
    skip_bad_rows: bool = _help("Skip and count malformed rows instead of stopping at the first one.",
                                default=False)
    instruction_key: str = _help("SFT column holding the instruction.", default="instruction")
    input_key: str = _help("SFT column holding the optional input.", default="input")
    output_key: str = _help("SFT column holding the response.", default="output")
    prompt_key: str = _help("Column holding the prompt (pairs, prompts).", default="prompt")
    chosen_key: str = _help("Pair column holding the preferred response.", default="chosen")
    rejected_key: str = _help("Pair column holding the worse response.", default="rejected")

    def keys(self) -> dict[str, str]:
        return {"instruction": self.instruction_key, "input": self.input_key, "output": self.output_key,
                "prompt": self.prompt_key, "chosen": self.chosen_key, "rejected": self.rejected_key}

    def validate(self) -> None:
        if self.max_len < 8:
            raise ConfigError("max_len", f"must be >= 8, got {self.max_len}")
        if not 0 <= self.eval_split < 1:
            raise ConfigError("eval_split", f"must be in [0, 1), got {self.eval_split}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError("max_samples", f"must be >= 1, got {self.max_samples}")


@dataclass
class TrainArgs:
    strategy: str = _help(f"Trainer strategy: one of {', '.join(STRATEGIES)}.", default="ddp")
    batch_size: int = _help("Micro-batch size per trainer.", default=8)
    accumulation_steps: int = _help("Micro-batches accumulated per optimizer step. Global batch = "
                                    "batch_size x accumulation_steps x trainers.", default=1)
    lr: Optional[float] = _help(f"Peak learning rate; default {PRESET_LR} for the tiny preset, "
                                f"{PRETRAINED_LR} for a --pretrain model.", default=None)
    max_epochs: int = _help("Passes over the training data.", default=1)
    max_steps: Optional[int] = _help("Stop after this many optimizer steps (default: max_epochs worth).",
                                     default=None)
    warmup_ratio: float = _help("Fraction of steps of linear warm-up before the cosine decay.", default=0.03)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2. 0.95 (as in GPT-3 and OpenRLHF) rather than torch's 0.999: with "
                              "0.999 a burst of large early gradients (e.g. from easy reward-model pairs) "
                              "shrinks the step for ~1000 steps.", default=0.95)
    grad_clip: float = _help("Clip the global gradient norm to this (0 disables).", default=1.0)
    seed: int = _help("Seed for model heads, data order and dropout.", default=42)
    log_interval: int = _help("Log metrics every N optimizer steps.", default=10)
    save_path: str = _help("Where the trained model (HF directory), checkpoints and logs go.",
                           default="outputs/sft")
    ckpt_interval: int = _help("Save a resumable checkpoint every N steps (0: only at the end).", default=0)
    resume: bool = _help("Resume from the latest checkpoint under --save_path.", default=False)
    eval_interval: int = _help("Evaluate every N steps (0: only at the end).", default=0)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        for name in ("batch_size", "accumulation_steps", "max_epochs", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("grad_clip", "ckpt_interval", "eval_interval", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")


@dataclass
class ClusterArgs:
    trainers: int = _help("Trainer actors; they form one torch.distributed group (gloo on CPU, nccl on GPU).",
                          default=1)
    address: Optional[str] = _help("Ray cluster to join (e.g. 'auto' or 'ray://host:10001'); default: "
                                   "$RAY_ADDRESS, else an embedded local Ray.", default=None)
    cpus_per_trainer: Optional[float] = _help(
        "CPUs reserved per trainer actor (also its torch thread count); default: this machine's cores "
        "shared among the trainers for an embedded Ray, 1 on a joined cluster.", default=None)
    gpus_per_trainer: float = _help("GPUs per trainer actor (0 on CPU).", default=0.0)

    def validate(self) -> None:
        if self.trainers < 1:
            raise ConfigError("trainers", f"must be >= 1, got {self.trainers}")
        if self.cpus_per_trainer is not None and self.cpus_per_trainer <= 0:
            raise ConfigError("cpus_per_trainer", f"must be > 0, got {self.cpus_per_trainer}")
        if self.gpus_per_trainer < 0:
            raise ConfigError("gpus_per_trainer", f"must be >= 0, got {self.gpus_per_trainer}")


    def trainer_cpus(self) -> float:
        import os

        if self.cpus_per_trainer is not None:
            return self.cpus_per_trainer
        if self.address or os.environ.get("RAY_ADDRESS"):
            return 1.0
        return max(1.0, float((os.cpu_count() or 1) // self.trainers))


@dataclass
class RMArgs:
    loss_fn: Literal["log_sig", "log_exp"] = _help("Pairwise loss: -log sigmoid(r_c - r_r) or "
                                                   "log(1 + exp(r_r - r_c)).", default="log_sig")


def validate_all(*parts) -> None:
    for p in parts:
        p.validate()
