"""The coefficient that weighs the KL penalty, step by step (the driver runs it: no torch here).

Controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
https://arxiv.org/abs/1909.08593, section 2.2): fixed, or adaptive towards a target KL.
"""

from __future__ import annotations


class FixedKLController:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = d["value"]


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon) (Ziegler et al. eq. 2)."""

    def __init__(self, coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = d["value"]


def make_kl_controller(coef: float, target: float | None, horizon: float):
    return AdaptiveKLController(coef, target, horizon) if target else FixedKLController(coef)
