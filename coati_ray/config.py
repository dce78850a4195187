"""Config dataclasses, one per concern, each field with its help text; validated once at the edge.

`transformers.HfArgumentParser` turns them into flags (see `coati_ray/cli.py`). The seed's flag
names (`--pretrain`, `--model`, `--strategy`, `--save_path`, `--dataset`, `--batch_size`,
`--accumulation_steps`, `--lr`, `--log_interval`, `--lora_rank`, ...) are the field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from coati_ray.errors import ConfigError

# colossalai_ddp / colossalai_hybrid run the colossalai booster path on CPU (see engines/strategy.py)
Strategy = Literal["ddp", "fsdp", "colossalai_zero2", "colossalai_gemini", "colossalai_ddp", "colossalai_hybrid"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelArgs:
    pretrain: str | None = _help("HF model directory to start from; default: the embedded tiny preset "
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
class BaseDataArgs:
    """What every stage's data has: the token budget and what to do with a malformed row."""

    max_len: int = _help("Truncate tokenized samples to this many tokens.", default=512)
    packing: bool = _help("Padding-free packing: a batch's sequences share rows (SFT/RM: of up to --max_len tokens; "
                          "PPO's scoring and training passes: no wider than the padded batch), each with its own "
                          "positions and a block-diagonal causal mask, instead of being padded to the longest (the "
                          "same results up to float noise; llama-family models with SDPA attention, others pad).",
                          default=True)
    skip_bad_rows: bool = _help("Skip and count malformed rows instead of stopping at the first one.",
                                default=False)

    def keys(self) -> dict[str, str]:
        """Canonical column name -> the column it is read from (see `coati_ray.data.loading`): one
        entry per `<name>_key` field of the stage's data class."""
        return {f.name.removesuffix("_key"): getattr(self, f.name) for f in fields(self) if f.name.endswith("_key")}

    def hub_options(self, flag: str) -> dict[str, str | None]:
        """load_rows' `split` and `config` for the dataset flag `flag` (its `<flag>_split`, `<flag>_config`)."""
        return {"split": getattr(self, f"{flag}_split"), "config": getattr(self, f"{flag}_config")}

    def validate(self) -> None:
        _at_least(self, 8, "max_len")
        for f in fields(self):
            if f.name.endswith("dataset_split") and not getattr(self, f.name).strip():
                raise ConfigError(f.name, "must name a split (e.g. train), got an empty value")


def _split_help(flag: str, default: str):
    return _help(f"Split of --{flag} when it is a Hub dataset id or a dataset repository (docs/stages.md#data); "
                 "a slice such as 'train[:1000]' works too.", default=default)


def _config_help(flag: str):
    return _help(f"Config (subset) of --{flag} when it is a Hub dataset id or a dataset repository; default: its "
                 "default config.", default=None)


@dataclass
class FileDataArgs(BaseDataArgs):
    """A training file and its held-out part: stages 1 and 2."""

    dataset: str | None = _help("Training data: a file (.json/.jsonl/.csv/.tsv/.parquet), a saved dataset or dataset "
                                "repository directory, or a Hugging Face Hub id (org/name); default: the demo data.",
                                default=None)
    dataset_split: str = _split_help("dataset", "train")
    dataset_config: str | None = _config_help("dataset")
    eval_dataset: str | None = _help("Held-out data (as --dataset); default: the demo eval split (or --eval_split "
                                     "of --dataset when --dataset is given).", default=None)
    eval_dataset_split: str = _split_help("eval_dataset", "test")
    eval_dataset_config: str | None = _config_help("eval_dataset")
    eval_split: float = _help("Fraction of --dataset held out for evaluation when --eval_dataset is not "
                              "given.", default=0.05)
    max_samples: int | None = _help("Use at most this many training rows.", default=None)

    def validate(self) -> None:
        BaseDataArgs.validate(self)
        if not 0 <= self.eval_split < 1:
            raise ConfigError("eval_split", f"must be in [0, 1), got {self.eval_split}")
        _at_least_or_none(self, 1, "max_samples")


@dataclass
class SFTDataArgs(FileDataArgs):
    """Stage 1: instruction / input / response rows (the prompt is the instruction followed by the
    input when a row has one, the loss covers the response), or conversations (the loss covers the
    assistant turns; see `coati_ray.data.conversations`)."""

    messages_key: str = _help("Column holding a conversation (OpenAI role/content or ShareGPT from/value turns); "
                              "'messages' also finds ShareGPT's 'conversations'.", default="messages")
    train_on: Literal["all", "last"] = _help("Which assistant turns of a conversation the loss covers: all of "
                                             "them, or the last only (system and user text never).", default="all")

    instruction_key: str = _help("Column holding the instruction.", default="instruction")
    input_key: str = _help("Column holding the optional input.", default="input")
    output_key: str = _help("Column holding the response.", default="output")


@dataclass
class PairDataArgs(FileDataArgs):
    """Stage 2: ranked pairs (a prompt, the preferred and the worse response)."""

    prompt_key: str = _help("Column holding the prompt.", default="prompt")
    chosen_key: str = _help("Column holding the preferred response.", default="chosen")
    rejected_key: str = _help("Column holding the worse response.", default="rejected")


@dataclass
class PreferenceDataArgs(PairDataArgs):
    """Offline preference optimization: pairs as for the reward model; KTO reads unpaired rows."""

    completion_key: str = _help("KTO: column holding the completion.", default="completion")
    label_key: str = _help("KTO: column saying whether the completion is desirable (true / false).",
                           default="label")


@dataclass
class PreferenceArgs:
    """The preference loss and its coefficients (`coati_ray.algos.preference` has the formulas)."""

    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = _help(
        "dpo, ipo, kto (against the frozen starting model's log-probs), simpo, orpo (reference-free).", default="dpo")
    beta: float | None = _help("DPO / IPO / KTO / SimPO beta; default 0.1 (SimPO 2.0, its paper's value).",
                               default=None)
    label_smoothing: float = _help("DPO: the assumed share of flipped labels (conservative DPO), in [0, 0.5).",
                                   default=0.0)
    gamma: float = _help("SimPO: the target reward margin gamma.", default=1.0)
    orpo_lambda: float = field(default=0.1, metadata={"help": "ORPO: weight lambda of the odds-ratio term.",
                                                      "aliases": ["--lambda"]})
    desirable_weight: float = _help("KTO: weight lambda_D of desirable rows.", default=1.0)
    undesirable_weight: float = _help("KTO: weight lambda_U of undesirable rows.", default=1.0)

    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.loss == "simpo" else 0.1)

    def validate(self) -> None:
        _positive_or_none(self, "beta")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "dpo":
            raise ConfigError("label_smoothing", f"applies to --loss dpo only, got --loss {self.loss}")
        for name in ("orpo_lambda", "desirable_weight", "undesirable_weight", "gamma"):
            _at_least(self, 0, name)


@dataclass
class PromptDataArgs(BaseDataArgs):
    """Stage 3 (PPO): the prompts file itself is PPO's --prompt_dataset; this is how it is read."""

    prompt_key: str = _help("Column of the prompts file holding the prompt.", default="prompt")
    prompt_dataset_split: str = _split_help("prompt_dataset", "train")
    prompt_dataset_config: str | None = _config_help("prompt_dataset")
    pretrain_dataset_split: str = _split_help("pretrain_dataset", "train")
    pretrain_dataset_config: str | None = _config_help("pretrain_dataset")


@dataclass
class RunArgs:
    """What every stage's run has: seed, logging, where it saves, checkpoints and resuming."""

    seed: int = _help("Seed for model heads, data order, sampling and dropout; the same seed gives the same run.",
                      default=42)
    log_interval: int = _help("Log a metrics line every N steps.", default=10)
    save_path: str = _help("Where the trained model (HF directory), checkpoints/ and tensorboard/ go.",
                           default="outputs/sft")
    ckpt_interval: int = _help("Save a resumable checkpoint every N steps (0: only at the end).", default=0)
    resume: str = _help("'auto' (or a bare --resume): continue from the latest checkpoint under --save_path, "
                        "starting fresh when there is none; a checkpoint directory: continue from it; 'no': "
                        "start fresh.", default="no")
    overwrite: bool = _help("Start fresh in a --save_path that holds a previous run: remove its checkpoints/, "
                            "tensorboard/ and run.json first (without this, such a directory is refused unless "
                            "--resume continues it).", default=False)
    keep_checkpoints: int = _help("Keep the newest N resumable checkpoints under --save_path/checkpoints and "
                                  "delete older ones (0: keep all).", default=2)
    report_to: str = _help("Experiment trackers, comma-separated: tensorboard (--save_path/tensorboard), wandb, "
                           "mlflow, or none; wandb and mlflow need the `track` extra (docs/stages.md).",
                           default="tensorboard")
    log_samples_interval: int = _help("PPO: every N steps, a table of sample generations (prompt, response, "
                                      "reward) to the trackers (0: never).", default=10)

    def validate(self) -> None:
        from coati_ray.run_dir import check_save_path
        from coati_ray.tracking import parse_report_to

        check_seed(self.seed)
        check_resume(self)
        check_save_path(self.save_path, self.resume, self.overwrite)
        _at_least(self, 0, "keep_checkpoints")
        _at_least(self, 1, "log_interval")
        _at_least(self, 0, "ckpt_interval")
        _at_least(self, 0, "log_samples_interval")
        parse_report_to(self.report_to)


@dataclass
class OptimArgs:
    """The optimizer side shared by the stages' trainer groups."""

    strategy: Strategy = _help(f"Trainer strategy: one of {', '.join(STRATEGIES)}.", default="ddp")
    lr: float | None = _help("Peak learning rate; default: by the stage and the model's size (SFT 1e-3 under 100M "
                             "parameters, 2e-5 to 3B, 5e-6 above; RM and DPO lower: docs/stages.md), said at "
                             "start-up.", default=None)
    max_epochs: int = _help("Passes over the training data.", default=1)
    max_steps: int | None = _help("Stop after this many optimizer steps (default: max_epochs worth).",
                                  default=None)
    grad_clip: float = _help("Clip the global gradient norm to this (0 disables).", default=1.0)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", f"unknown strategy {self.strategy!r}; expected one of "
                              f"{', '.join(STRATEGIES)}")
        _at_least(self, 1, "max_epochs")
        _at_least(self, 0, "grad_clip")
        _positive_or_none(self, "lr")
        _at_least_or_none(self, 1, "max_steps")


@dataclass
class TrainArgs(RunArgs, OptimArgs):
    """Stages 1 and 2 (SFT, reward model): run and optimizer settings plus the batch layout."""

    batch_size: int = _help("Micro-batch size per trainer.", default=8)
    accumulation_steps: int = _help("Micro-batches accumulated per optimizer step. Global batch = "
                                    "batch_size x accumulation_steps x trainers.", default=1)
    warmup_ratio: float = _help("Fraction of steps of linear warm-up before the cosine decay.", default=0.03)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2. 0.95 (as in GPT-3 and OpenRLHF) rather than torch's 0.999: with "
                              "0.999 a burst of large early gradients (e.g. from easy reward-model pairs) "
                              "shrinks the step for ~1000 steps.", default=0.95)
    eval_interval: int = _help("Evaluate every N steps (0: only at the end).", default=0)

    def validate(self) -> None:
        RunArgs.validate(self)
        OptimArgs.validate(self)
        for name in ("batch_size", "accumulation_steps"):
            _at_least(self, 1, name)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("eval_interval", "weight_decay"):
            _at_least(self, 0, name)


def _at_least(args, low: float, name: str) -> None:
    if getattr(args, name) < low:
        raise ConfigError(name, f"must be >= {low}, got {getattr(args, name)}")


def _at_least_or_none(args, low: float, name: str) -> None:
    if getattr(args, name) is not None:
        _at_least(args, low, name)


def _positive_or_none(args, name: str) -> None:
    if getattr(args, name) is not None and getattr(args, name) <= 0:
        raise ConfigError(name, f"must be > 0, got {getattr(args, name)}")


@dataclass
class ClusterArgs:
    trainers: int = _help("Trainer actors; they form one torch.distributed group (gloo on CPU, nccl on GPU).",
                          default=1)
    address: str | None = _help("Ray cluster to join (e.g. 'auto' or 'ray://host:10001'); default: "
                                   "$RAY_ADDRESS, else an embedded local Ray.", default=None)
    cpus_per_trainer: float | None = _help(
        "CPUs reserved per trainer actor (also its torch thread count); default: this machine's cores "
        "shared among the trainers for an embedded Ray, 1 on a joined cluster.", default=None)
    gpus_per_trainer: float = _help("GPUs per trainer actor (0 on CPU).", default=0.0)
    dashboard_host: str = _help("Address the embedded Ray's dashboard listens on. Keep 127.0.0.1 (tunnel it with "
                                "ssh -L 8265:127.0.0.1:8265); 0.0.0.0 exposes it, behind Ray's token auth only.",
                                default="127.0.0.1")
    dashboard: bool = _help("Start the embedded Ray's dashboard. --no_dashboard: a leaner laptop run (about 200 MB "
                            "and up to 2 s of start-up less; docs/benchmarks.md); a joined cluster keeps its own.",
                            default=True)

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


def check_resume(args) -> None:
    """Normalise `args.resume` (True / False from Python callers) and check it."""
    import os

    if isinstance(args.resume, bool):
        args.resume = "auto" if args.resume else "no"
    if args.resume not in ("no", "auto") and not os.path.isdir(args.resume):
        raise ConfigError("resume", f"expected 'auto', 'no' or a checkpoint directory; {args.resume} is none of them")


SEED_MAX = 2 ** 32 - 1  # the seeds derived from it (x 1_000_003 + step ...) stay inside torch's 64 bits


def check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError("seed", f"must be in [0, {SEED_MAX}], got {seed}")


def check_finite(args) -> None:
    """Refuse nan and inf in any float field (`--lr nan` compares False with every bound)."""
    import math

    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")


def validate_all(*parts) -> None:
    for p in parts:
        check_finite(p)
        p.validate()
