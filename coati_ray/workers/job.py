"""What every PPO role is built from: resolved paths plus the config parts it needs (pickled to actors)."""

from __future__ import annotations

from dataclasses import dataclass

from coati_ray.config import DataArgs, ModelArgs, PPOArgs


@dataclass
class PPOJob:
    policy_path: str  # initial policy; also the frozen reference
    reward_path: str
    critic_path: str | None  # None for critic-free estimators
    prompt_file: str
    pretrain_file: str | None  # PTX text (None when ptx_coef is 0)
    model: ModelArgs  # family, dtype, LoRA
    data: DataArgs  # max_len and column names
    ppo: PPOArgs
    is_preset: bool = True
    stage: str = "ppo"

    @property
    def lora(self) -> dict | None:
        m = self.model
        return {"rank": m.lora_rank, "alpha": m.lora_alpha, "target_modules": m.lora_target_modules} \
            if m.lora_rank > 0 else None
