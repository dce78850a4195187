"""What each PPO role is built from: resolved paths plus only the config parts it reads (pickled to actors).

    RolloutJob   generators:       the policy, the prompts, sampling (RolloutArgs), reward shaping
    PolicyJob    policy trainers:  the policy, the update schedule, the actor loss, PTX text
    CriticJob    critic trainers:  the value model, the update schedule, GAE and the value loss
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coati_ray.config import ModelArgs, PromptDataArgs
from coati_ray.ppo_config import ObjectiveArgs, RolloutArgs


def lora_of(model: ModelArgs) -> dict | None:
    """The LoRA settings of a run (None: full fine-tuning)."""
    return {"rank": model.lora_rank, "alpha": model.lora_alpha, "target_modules": model.lora_target_modules} \
        if model.lora_rank > 0 else None


@dataclass
class ModelJob:
    """A role's model settings (family, dtype, LoRA); each job below adds what its role reads."""

    model: ModelArgs

    @property
    def lora(self) -> dict | None:
        return lora_of(self.model)


@dataclass
class UpdateSpec:
    """How a PPO trainer group updates: the same for the policy and the critic but the learning rate."""

    strategy: str
    lr: float | None  # the flag; None: the default for the model's size (coati_ray/lr_defaults.py)
    grad_clip: float
    train_batch_size: int  # samples per optimizer step per rank
    max_epochs: int  # passes over each step's experience
    seed: int  # model init, LoRA init, minibatch order


@dataclass
class RolloutJob(ModelJob):
    policy_path: str  # initial policy (tokenizer too)
    prompt_file: str
    data: PromptDataArgs  # max_len, prompt column, bad rows
    rollout: RolloutArgs
    objective: ObjectiveArgs  # KL estimator, reward shaping, critic-free advantages
    seed: int
    engine_options: dict  # extra engine arguments of the weight-sync transport (vllm)
    reward_specs: list = field(default_factory=list)  # RewardSpec of each source: weights and metric names


@dataclass
class PolicyJob(ModelJob):
    policy_path: str
    update: UpdateSpec
    objective: ObjectiveArgs  # eps_clip, ptx_coef, entropy_coef
    temperature: float  # log-probs under the sampling distribution
    pretrain_file: str | None  # PTX text (None when ptx_coef is 0)
    data: PromptDataArgs  # max_len, bad rows (of the PTX text)
    max_new_tokens: int = 64  # the constant normalizer of --loss_agg seq_mean_token_sum_norm


@dataclass
class CriticJob(ModelJob):
    critic_path: str
    tokenizer_path: str  # the policy's (pad token of the experience)
    update: UpdateSpec
    objective: ObjectiveArgs  # gamma, lam, whiten_advantages, value_clip
    n_samples_per_prompt: int
    packing: bool = True  # --packing: run padded experience packed (models/heads.py)


@dataclass
class PolicyTrainOut:
    """What a policy rank's PPO update returns to the driver (here, where the driver reads it without torch)."""

    metrics: dict[str, float]
    sample_ids: list[list[int]]  # per PPO epoch, the ids this rank trained on
    versions: list[int]  # weight version of every sample of the step
