"""PPO losses as summed quantities, so callers can normalise by a global token count.

Each function returns the *sum* over masked positions; divide by the number of action tokens in
the global minibatch (all ranks, all micro-batches) for the token-mean. This keeps data-parallel
and accumulated updates equal to one big batch (the same rule as the SFT loss).
"""

from __future__ import annotations

import torch

from coati_ray.algos.objectives import PolicyLossOut, clipped_policy_loss

__all__ = ["PolicyLossOut", "policy_loss", "value_loss"]


def policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, eps_clip: float = 0.2, **options) -> PolicyLossOut:
    """Clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, eq. 7):

        L = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A),  ratio = pi(a) / pi_old(a)

    All inputs (B, A). approx_kl uses k3 of log(pi_old / pi) (Schulman's estimator). `options`
    (DAPO's decoupled clip range, the aggregation mode, IS weights): see
    `objectives.clipped_policy_loss`, of which this is the symmetric, token-sum case.
    """
    return clipped_policy_loss(log_probs, old_log_probs, advantages, action_mask, eps_clip, **options)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor,
               value_clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the PPO2 baselines form; Andrychowicz et al. 2021 discuss it):

        L = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

    Returns (loss sum, count of tokens where the clipped term was larger). (B, A) inputs.
    """
    m = action_mask.to(values.dtype)
    unclipped = (values - returns).square()
    if value_clip is None or value_clip <= 0:
        return 0.5 * (unclipped * m).sum(), torch.zeros((), dtype=values.dtype, device=values.device)
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    clipped = (v_clipped - returns).square()
    loss = 0.5 * torch.max(unclipped, clipped)
    with torch.no_grad():
        frac = ((clipped > unclipped).to(m.dtype) * m).sum()
    return (loss * m).sum(), frac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) per position: (B, T, V) -> (B, T)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over masked positions: 1 is a perfect critic, <= 0 no better than a constant."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    if r.numel() < 2:
        return float("nan")
    var_r = r.var()
    return float(1.0 - (r - v).var() / var_r) if var_r > 0 else float("nan")


def combine_actor_loss(policy: torch.Tensor, ptx: torch.Tensor | None, ptx_coef: float,
                       entropy: torch.Tensor | None = None, entropy_coef: float = 0.0) -> torch.Tensor:
    """ColossalChat's combination: (1 - ptx_coef) * policy + ptx_coef * ptx, minus an entropy bonus.

    With no pretraining batch (ptx is None) the policy loss is used alone, unscaled.
    """
    loss = policy if ptx is None else (1.0 - ptx_coef) * policy + ptx_coef * ptx
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy
    return loss
