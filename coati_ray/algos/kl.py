"""KL between the policy and the frozen reference, per token, and the coefficient that weighs it.

Estimators of KL(pi || ref) from samples of pi, with log_ratio = log pi(a) - log ref(a) (Schulman,
"Approximating KL divergence", http://joschu.net/blog/kl-approx.html):

    k1 = log_ratio                      unbiased, high variance, can be negative per token
    k2 = log_ratio**2 / 2               biased, low variance, >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio  unbiased, low variance, >= 0

The coefficient's controllers are in `kl_control.py` (the driver runs them, without torch).
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
