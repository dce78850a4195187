"""Offline preference-optimization losses, as pure functions of per-sequence log-probs.

Inputs are (B,) float tensors; `pi_*` / `ref_*` are SUMS over the response tokens of log pi(token)
under the policy / the frozen reference, `len_*` the response token counts (floats, >= 1).
Each loss is returned per row, shape (B,); the caller decides how to average (as in `rm_loss`).
Reported rewards are detached. With h = (pi_c - ref_c) - (pi_r - ref_r):

  dpo    -log sigmoid(beta h)                              Rafailov et al. 2023, eq. 7
         cDPO (label_smoothing eps): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                                                           Mitchell 2023, "A note on DPO with noisy preferences"
  ipo    (h - 1/(2 beta))^2                                Azar et al. 2023, eq. 17
  simpo  -log sigmoid(beta/|y_w| pi_c - beta/|y_l| pi_r - gamma)   Meng et al. 2024, eq. 6
  orpo   -mean logp(y_w) + lam * -log sigmoid(log odds(y_w) - log odds(y_l))
                                                           Hong et al. 2024, eqs. 4-7
  kto    lambda_y - v(x, y), v = lambda_D sigmoid(beta (r - z0)) | lambda_U sigmoid(beta (z0 - r))
                                                           Ethayarajh et al. 2024, eq. 8
SimPO and ORPO are reference-free (`REFERENCE_FREE`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

PreferenceLossName = Literal["dpo", "ipo", "simpo", "orpo", "kto"]
PREFERENCE_LOSSES: tuple[str, ...] = ("dpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE: tuple[str, ...] = ("simpo", "orpo")  # need no reference log-probs

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# ORPO: the mean log-prob a is clamped to at most this before log(1 - exp(a)), so a -> 0 (p -> 1)
# gives a large finite log-odds instead of +inf / NaN.
ORPO_MAX_MEAN_LOGP = -1e-6


def _h(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
       ref_rejected: torch.Tensor) -> torch.Tensor:
    return (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)  # (B,)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> Triple:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7): -log sigmoid(beta h).

    label_smoothing eps > 0 is conservative DPO (Mitchell 2023): the label is flipped with
    probability eps, loss = -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    Returns (loss (B,), rewards_chosen (B,), rewards_rejected (B,)), rewards = beta (pi - ref).
    """
    logits = beta * _h(pi_chosen, pi_rejected, ref_chosen, ref_rejected)  # (B,)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # (B,)
    rewards_chosen = (beta * (pi_chosen - ref_chosen)).detach()  # (B,)
    rewards_rejected = (beta * (pi_rejected - ref_rejected)).detach()  # (B,)
    return loss, rewards_chosen, rewards_rejected


def ipo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> Triple:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17): (h - 1/(2 beta))^2, beta playing the paper's tau.

    h is computed from the SUMMED log-probs, as in the paper; TRL averages the log-probs per token
    instead, so its h (and the useful range of beta) differs by the response lengths.
    Returns (loss (B,), rewards_chosen, rewards_rejected), rewards = beta (pi - ref) as in DPO.
    """
    h = _h(pi_chosen, pi_rejected, ref_chosen, ref_rejected)  # (B,)
    loss = (h - 1.0 / (2.0 * beta)) ** 2  # (B,)
    rewards_chosen = (beta * (pi_chosen - ref_chosen)).detach()  # (B,)
    rewards_rejected = (beta * (pi_rejected - ref_rejected)).detach()  # (B,)
    return loss, rewards_chosen, rewards_rejected


def simpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, len_chosen: torch.Tensor,
               len_rejected: torch.Tensor, beta: float, gamma: float) -> Triple:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6): -log sigmoid(beta/|y_w| pi_c - beta/|y_l| pi_r - gamma). Reference-free.

    Returns (loss (B,), rewards_chosen, rewards_rejected), rewards = beta pi / len (the length-
    normalised implicit reward of the paper's eq. 4).
    """
    rewards_chosen = beta * pi_chosen / len_chosen  # (B,)
    rewards_rejected = beta * pi_rejected / len_rejected  # (B,)
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected - gamma)  # (B,)
    return loss, rewards_chosen.detach(), rewards_rejected.detach()


def _log_odds(a: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from a = log p <= 0: a - log(1 - exp(a)), stable on both sides of -log 2."""
    a = a.clamp(max=ORPO_MAX_MEAN_LOGP)  # (B,)
    # log(1 - e^a): -expm1 is accurate near a = 0, log1p(-exp) for very negative a
    log1m_exp = torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    return a - log1m_exp  # (B,)


def orpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, len_chosen: torch.Tensor,
              len_rejected: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eqs. 4-7). Reference-free.

    With mean log-probs a = pi / len and log odds(y) = a - log(1 - exp(a)):
    L_OR = -log sigmoid(log odds_c - log odds_r), L_SFT = -a_chosen, loss = L_SFT + lam L_OR.
    a is clamped to at most ORPO_MAX_MEAN_LOGP (-1e-6) inside the odds, so a = 0 stays finite (the
    odds term then has no gradient through that row's a; L_SFT still does).
    Returns (loss (B,), rewards_chosen, rewards_rejected, log_odds_ratio (B,)). The rewards are the
    mean log-probs a themselves (TRL reports beta * a instead); log_odds_ratio = odds_c - odds_r.
    """
    a_chosen = pi_chosen / len_chosen  # (B,)
    a_rejected = pi_rejected / len_rejected  # (B,)
    log_odds_ratio = _log_odds(a_chosen) - _log_odds(a_rejected)  # (B,)
    loss = -a_chosen + lam * -F.logsigmoid(log_odds_ratio)  # (B,)
    return loss, a_chosen.detach(), a_rejected.detach(), log_odds_ratio.detach()


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8).

    r = pi - ref; z0 = `kl` (a scalar, detached: see `kto_kl_estimate`); desirable (B,) bool.
    v = lambda_D sigmoid(beta (r - z0)) on desirable rows, lambda_U sigmoid(beta (z0 - r)) otherwise;
    per-row loss = lambda_y - v. Returns (loss (B,), rewards = beta r (B,), detached).
    """
    r = pi - ref  # (B,)
    z0 = kl.detach()  # ()
    lam = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))  # (B,)
    margin = torch.where(desirable, r - z0, z0 - r)  # (B,)
    loss = lam * torch.sigmoid(-beta * margin)  # (B,) = lambda_y - v, as lam (1 - sigmoid(x)) = lam sigmoid(-x)
    return loss, (beta * r).detach()


def kto_kl_estimate(pi_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(pi - ref)) over mismatched (prompt, another row's
    completion) pairs, detached (the paper's estimate, as in TRL): (B,), (B,) -> ()."""
    return (pi_mismatched - ref_mismatched).mean().clamp(min=0).detach()
