"""Rewards per token and advantage estimators, as pure functions of (B, A) tensors.

Shapes: B sequences, A action (response) positions; `action_mask` (B, A) is 1 on real response
tokens (the final EOS included) and 0 on the right padding after them. Samples of one prompt
are consecutive: rows [i*n, (i+1)*n) share prompt i (n = samples per prompt).

Registry `ADVANTAGE_ESTIMATORS` (name -> function), each returning (advantages, returns), (B, A):
    gae   Generalised Advantage Estimation with a critic (Schulman et al. 2016,
          https://arxiv.org/abs/1506.02438, eq. 11-16)
    grpo  sequence score normalised within its prompt's group (Shao et al. 2024, DeepSeekMath,
          https://arxiv.org/abs/2402.03300, section 4.1.2, outcome supervision)
    rloo  REINFORCE leave-one-out baseline (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740)
    dr_grpo  group mean subtracted, no division by the group std (Liu et al. 2025, "Understanding
          R1-Zero-Like Training", https://arxiv.org/abs/2503.20783, sec. 3.1 and fig. 1)
    reinforce_pp  REINFORCE++ (Hu et al. 2025, https://arxiv.org/abs/2501.03262): KL-penalised
          token rewards, discounted return per token, whitened over the batch
    reinforce_pp_baseline  REINFORCE++ with the prompt's group-mean score subtracted first
For grpo, rloo and dr_grpo the shaped score plus the per-token KL penalty is summed to the end of
the sequence (gamma = 1 by default), as OpenRLHF does for critic-free estimators; the reinforce_pp
pair then whitens those returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last response token of each row: (B, A) -> (B,). Rows need >= 1 token."""
    A = action_mask.shape[1]
    positions = torch.arange(A, device=action_mask.device).expand_as(action_mask)
    return (positions * action_mask.long()).argmax(dim=1)


def kl_penalized_rewards(score: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * kl_t, plus the sequence score on its last response token.

    InstructGPT's objective (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 2) with the
    KL spread per token as in Ziegler et al. 2019. score: (B,); kl, action_mask: (B, A) -> (B, A).
    """
    rewards = -kl_coef * kl * action_mask
    idx = last_action_index(action_mask).unsqueeze(1)  # (B, 1)
    return rewards.scatter_add(1, idx, score.to(rewards.dtype).unsqueeze(1))


def normalize_scores(score: torch.Tensor, clip: float | None = None, normalize: bool = False,
                     eps: float = 1e-8) -> torch.Tensor:
    """Optionally whiten the batch's sequence scores, then clip them to [-clip, clip]. (B,) -> (B,)"""
    if normalize and score.numel() > 1:
        score = (score - score.mean()) / (score.std() + eps)
    if clip:
        score = score.clamp(-clip, clip)
    return score


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance); zero where mask is 0."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean).square() * m).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def gae(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t.

    V past the last response token is 0 (the episode ends there). rewards, values, action_mask:
    (B, A) -> (advantages, returns), (B, A), zero on padding.
    """
    m = action_mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    A = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(A)):  # a loop over positions only; rows are vectorised
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        next_value = values[:, t]
        adv[:, t] = next_adv
    return adv, (adv + values) * m


def discounted_returns(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k>=t} gamma^(k-t) r_k over the response. (B, A) -> (B, A)"""
    m = action_mask.to(rewards.dtype)
    rewards = rewards * m
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * m


def group_normalized_scores(score: torch.Tensor, n: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (s_i - mean(group)) / (std(group) + eps), groups of n consecutive rows. (B,) -> (B,)"""
    g = score.view(-1, n)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


def leave_one_out_scores(score: torch.Tensor, n: int) -> torch.Tensor:
    """RLOO: s_i - mean_{j != i} s_j over groups of n consecutive rows. (B,) -> (B,)"""
    g = score.view(-1, n)
    return (g - (g.sum(1, keepdim=True) - g) / (n - 1)).view(-1)


def group_centered_scores(score: torch.Tensor, n: int) -> torch.Tensor:
    """s_i - mean(group), groups of n consecutive rows, no std division. (B,) -> (B,)

    Dr. GRPO's advantage (Liu et al. 2025, https://arxiv.org/abs/2503.20783, sec. 3.1: GRPO's eq. 2
    without the std(R) term) and REINFORCE++-baseline's baseline (https://arxiv.org/abs/2501.03262).
    """
    g = score.view(-1, n)
    return (g - g.mean(1, keepdim=True)).view(-1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of x over the mask, float64, shape (3,).

    Moments add: sum them over the chunks of a step (or all-reduce them over ranks) and pass the total
    to `whiten_with_moments` to whiten every chunk with the statistics of the whole (global) batch.
    """
    m = mask.double()
    x = x.double() * m
    return torch.stack([m.sum(), x.sum(), x.square().sum()])


def whiten_with_moments(x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std with mean and unbiased variance from `masked_moments` totals; zero off the mask.

    Equals `masked_whiten(x, mask)` when the moments are those of x itself (up to rounding).
    """
    n, s, sq = moments.double().unbind()
    mean = s / n
    var = ((sq - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    return (out * mask.double()).to(x.dtype)


def _critic_free(shape: Callable[[torch.Tensor, int], torch.Tensor]):
    def estimator(score, kl, action_mask, kl_coef, values=None, n_samples_per_prompt=1, gamma=1.0, lam=0.95):
        rewards = kl_penalized_rewards(shape(score, n_samples_per_prompt), kl, action_mask, kl_coef)
        returns = discounted_returns(rewards, action_mask, gamma)
        return returns, returns
    return estimator


def gae_estimator(score, kl, action_mask, kl_coef, values=None, n_samples_per_prompt=1, gamma=1.0, lam=0.95):
    if values is None:
        raise ValueError("the 'gae' estimator needs critic values")
    return gae(kl_penalized_rewards(score, kl, action_mask, kl_coef), values, action_mask, gamma, lam)


def _reinforce_pp(shape: Callable[[torch.Tensor, int], torch.Tensor] | None):
    def estimator(score, kl, action_mask, kl_coef, values=None, n_samples_per_prompt=1, gamma=1.0, lam=0.95):
        """REINFORCE++ (Hu et al. 2025, https://arxiv.org/abs/2501.03262, sec. 3; eq. 8-10 of the early
        versions, whose numbering later versions changed):

            r_t = 1[t = last] * s - kl_coef * KL_t,   G_t = sum_{k>=t} gamma^(k-t) r_k,
            A_t = (G_t - mean(G)) / std(G), mean and std over every response token of the batch.

        With `shape` (the baseline variant) s is the group-mean-centred score s_i - mean(group) first.
        The whitening uses the rows passed in; when a step's batch arrives in chunks (or over ranks),
        re-whiten the returned `returns` with the summed `masked_moments` of all chunks
        (`whiten_with_moments`) to get the paper's global normalisation.
        """
        s = score if shape is None else shape(score, n_samples_per_prompt)
        returns = discounted_returns(kl_penalized_rewards(s, kl, action_mask, kl_coef), action_mask, gamma)
        return masked_whiten(returns, action_mask), returns
    return estimator


# Every estimator: (score (B,), kl (B, A), action_mask (B, A), kl_coef, values (B, A) | None,
#                   n_samples_per_prompt, gamma, lam) -> (advantages (B, A), returns (B, A))
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "gae": gae_estimator,
    "grpo": _critic_free(group_normalized_scores),
    "rloo": _critic_free(leave_one_out_scores),
    "dr_grpo": _critic_free(group_centered_scores),
    "reinforce_pp": _reinforce_pp(None),
    "reinforce_pp_baseline": _reinforce_pp(group_centered_scores),
}
