"""Learning-rate defaults read off the model: its parameter count, by stage.

The default used to depend on whether `--pretrain` was given, so the README's stage 1 -> 2 -> 3 on
the tiny model trained its reward model at a rate meant for 7B models (5e-6: held-out accuracy
0.56 after 20 steps, where the demo's 2e-4 reaches 0.96). A model's size says more about the rate
it needs than where it came from: a few-million-parameter model (the presets, a toy trained from
them) learns at 1e-4 to 1e-3; models of billions of parameters at 1e-6 to 1e-5 (full fine-tuning).

Sources of the large-model values: ColossalChat's SFT / RM examples (5e-6), TRL's SFTConfig (2e-5),
RewardConfig (1e-5 in its examples) and DPOConfig (1e-6), OpenRLHF's PPO actor / critic (5e-7 /
9e-6 for 7B, 1e-6 for smaller actors). The small-model values are the ones the demo measured.
LoRA is not told apart: a LoRA run usually wants a higher rate (1e-4 to 2e-4); give it with --lr.
"""

from __future__ import annotations

SMALL, LARGE = 100e6, 3e9  # under SMALL: small; SMALL up to LARGE: medium; LARGE and up: large
# role -> (small, medium, large)
LR = {
    "sft": (1e-3, 2e-5, 5e-6),
    "rm": (2e-4, 1e-5, 5e-6),
    "dpo": (1e-4, 1e-6, 5e-7),
    "ppo": (2e-5, 1e-6, 5e-7),
    "critic": (1e-4, 9e-6, 9e-6),
}
TIER_NAMES = ("under 100M parameters", "100M to 3B parameters", "3B parameters and up")


def default_lr(role: str, n_params: int) -> tuple[float, str]:
    """(learning rate, why) for a model of `n_params` parameters trained as `role`
    (sft, rm, dpo: the stage; ppo, critic: PPO's two trainer groups)."""
    if role not in LR:
        raise ValueError(f"no learning-rate default for {role!r}; expected one of {', '.join(LR)}")
    tier = 0 if n_params < SMALL else 1 if n_params < LARGE else 2
    return LR[role][tier], f"the {role} default for a {n_params / 1e6:.1f}M-parameter model ({TIER_NAMES[tier]})"


def lr_and_why(flag: float | None, role: str, n_params: int, flag_name: str = "--lr") -> tuple[float, str]:
    """The flag's value when given, else the size default; and a few words saying which."""
    if flag:
        return flag, f"from {flag_name}"
    lr, why = default_lr(role, n_params)
    return lr, f"{why}; {flag_name} sets it"
