"""Pairwise reward-model losses (InstructGPT, Ouyang et al. 2022, eq. 1).

Both are the same function of the margin m = r_chosen - r_rejected:
  log_sig:  -log sigmoid(m)          (written with logsigmoid, stable for large |m|)
  log_exp:  log(1 + exp(-m))         (ColossalChat's LogExpLoss; softplus(-m), identical value)
Each returns the per-pair loss, shape (B,); the caller decides how to average.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

RMLossName = Literal["log_sig", "log_exp"]


def log_sig_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """chosen, rejected: (B,) -> (B,)"""
    return -F.logsigmoid(chosen - rejected)


def log_exp_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """chosen, rejected: (B,) -> (B,)"""
    return F.softplus(rejected - chosen)


RM_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "log_sig": log_sig_loss,
    "log_exp": log_exp_loss,
}
