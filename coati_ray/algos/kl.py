"""KL between the policy and the frozen reference, per token, and the coefficient that weighs it.

Estimators of KL(pi || ref) from samples of pi, with log_ratio = log pi(a) - log ref(a) (Schulman,
"Approximating KL divergence", http://joschu.net/blog/kl-approx.html):

    k1 = log_ratio                      unbiased, high variance, can be negative per token
    k2 = log_ratio**2 / 2               biased, low variance, >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio  unbiased, low variance, >= 0

Controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
https://arxiv.org/abs/1909.08593, section 2.2): fixed, or adaptive towards a target KL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # Clamped so that one very unlikely reference token cannot overflow exp().
    log_ratio = log_ratio.clamp(-20.0, 20.0)
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def token_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, action_mask: torch.Tensor,
             estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate, zero on padding. All (B, A) -> (B, A)."""
    return KL_ESTIMATORS[estimator](log_probs.float() - ref_log_probs.float()) * action_mask


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
