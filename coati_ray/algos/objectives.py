"""Policy objectives beyond PPO's symmetric clip, loss aggregation, and off-policy corrections.

Pure functions of (B, A) tensors (B sequences, A response positions; `action_mask` 1 on real
response tokens). Like `losses.policy_loss`, every loss returns a `PolicyLossOut` of *sums* over this
micro-batch; the caller divides by the matching *global* denominator (all micro-batches, all ranks),
which keeps accumulated and data-parallel updates equal to one big batch.

Aggregation (`aggregate` gives the micro-batch numerator, `aggregate_count` its share of the global
denominator; loss = sum of numerators / sum of counts):
    token_mean               sum_{i,t} l_it / (global token count)                 DAPO eq. 12
    seq_mean_token_mean      sum_i (mean_t l_it) / (global sequence count)         GRPO, GSPO eq. 5
    seq_mean_token_sum_norm  sum_i (sum_t l_it) / norm_len / (global sequence count) Dr. GRPO
`norm_len` must be a constant of the run (e.g. the maximum generation length), not a micro-batch's
padded width A, which differs between micro-batches and would break the equivalence.
Sequences with no response token count nowhere (a padding row contributes 0 / 0).

Losses: `clipped_policy_loss` (PPO with DAPO's decoupled clip range), `gspo_loss` (sequence-level
ratio), `cispo_loss` (clipped, stop-gradient IS weight on a REINFORCE term). Each accepts `weights`
(B, A), e.g. `tis_weights`, multiplied into the per-token loss before aggregation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class PolicyLossOut:
    loss_sum: torch.Tensor  # scalar, differentiable: this micro-batch's numerator (see `aggregate`)
    clipped: torch.Tensor  # scalar: tokens where the clipped term (or weight) was the active one
    approx_kl_sum: torch.Tensor  # scalar: sum of k3(old -> new) per token

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
AGG_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------

def aggregate(loss_tokens: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              norm_len: float | None = None) -> torch.Tensor:
    """This micro-batch's numerator of the aggregated loss: (B, A), (B, A) -> scalar (differentiable).

    token_mean: sum of l over real tokens (the existing rule: divide by the global token count).
    seq_mean_token_mean: sum over sequences of each sequence's token mean.
    seq_mean_token_sum_norm: sum over sequences of (token sum / norm_len) — Dr. GRPO (Liu et al. 2025,
        https://arxiv.org/abs/2503.20783, sec. 3.1) drops GRPO's 1/|o_i| for a constant.
    Divide the total over all micro-batches and ranks by the total of `aggregate_count(mask, mode)`.
    """
    m = mask.to(loss_tokens.dtype)
    if mode == "token_mean":
        return (loss_tokens * m).sum()
    per_seq = (loss_tokens * m).sum(1)  # (B,)
    if mode == "seq_mean_token_mean":
        return (per_seq / m.sum(1).clamp(min=1)).sum()
    if mode == "seq_mean_token_sum_norm":
        if norm_len is None or norm_len <= 0:
            raise ValueError("seq_mean_token_sum_norm needs a positive constant norm_len (e.g. max_new_tokens)")
        return per_seq.sum() / norm_len
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")


def aggregate_count(mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """This micro-batch's share of the global denominator for `mode`: tokens, or sequences with >= 1 token."""
    if mode == "token_mean":
        return mask.sum()
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        return (mask.sum(1) > 0).sum().to(mask.dtype)
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")


def _approx_kl_sum(log_ratio: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # k3 of KL(pi_old || pi) with r = pi / pi_old: r - 1 - log r (Schulman's estimator)
    with torch.no_grad():
        return ((torch.expm1(log_ratio) - log_ratio) * m).sum()


def _weighted(loss: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return loss if weights is None else loss * weights.detach()


# ----------------------------------------------------------------------------------------------
# Policy losses
# ----------------------------------------------------------------------------------------------

def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, lo: float, hi: float,
                       m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(r A, clip(r, 1 - lo, 1 + hi) A) per token (B, A), and the count of real tokens where the clip was active."""
    surr1 = ratio * adv
    surr2 = ratio.clamp(1.0 - lo, 1.0 + hi) * adv
    with torch.no_grad():
        clipped = ((surr2 < surr1).to(m.dtype) * m).sum()
    return -torch.min(surr1, surr2), clipped


def clipped_policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                        action_mask: torch.Tensor, eps_clip: float = 0.2, *, eps_clip_low: float | None = None,
                        eps_clip_high: float | None = None, agg: str = "token_mean", norm_len: float | None = None,
                        weights: torch.Tensor | None = None) -> PolicyLossOut:
    """PPO's clipped surrogate with DAPO's decoupled range ("clip-higher", Yu et al. 2025,
    https://arxiv.org/abs/2503.14476, eq. 10):

        l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),  r_t = pi(a_t) / pi_old(a_t)

    eps_clip_low / eps_clip_high default to eps_clip: then it is PPO's clip (Schulman et al. 2017,
    https://arxiv.org/abs/1707.06347, eq. 7; `losses.policy_loss`). All inputs (B, A). `clipped` counts
    tokens where the clipped term was the active one; `approx_kl_sum` is k3 per token.
    """
    lo = eps_clip if eps_clip_low is None else eps_clip_low
    hi = eps_clip if eps_clip_high is None else eps_clip_high
    m = action_mask.to(log_probs.dtype)
    log_ratio = log_probs - old_log_probs
    loss, clipped = _clipped_surrogate(log_ratio.exp(), advantages, lo, hi, m)
    return PolicyLossOut(aggregate(_weighted(loss, weights), m, agg, norm_len), clipped, _approx_kl_sum(log_ratio, m))


def sequence_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = (1/|y_i|) sum_t (log pi - log pi_old): GSPO's length-normalised sequence ratio
    (Zheng et al. 2025, https://arxiv.org/abs/2507.18071, eq. 7). (B, A) -> (B,), differentiable."""
    m = mask.to(log_probs.dtype)
    return ((log_probs - old_log_probs) * m).sum(1) / m.sum(1).clamp(min=1)


def gspo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
              action_mask: torch.Tensor, eps_low: float = 3e-4, eps_high: float = 4e-4, *, token_level: bool = False,
              agg: str = "seq_mean_token_mean", norm_len: float | None = None,
              weights: torch.Tensor | None = None) -> PolicyLossOut:
    """Group Sequence Policy Optimization (Zheng et al. 2025, https://arxiv.org/abs/2507.18071):

        L_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i),  s_i from `sequence_log_ratio`
        (eq. 5 and 7; the paper averages L_i over the G sequences, hence agg = seq_mean_token_mean).

    token_level=False (GSPO): one advantage per sequence, A_i = advantages[:, 0] when advantages is
    (B, A) (the return of the whole response; constant per row for grpo/dr_grpo at kl_coef 0), or
    advantages itself when (B,). Every token of row i carries L_i, differentiable through s_i, so its
    token mean is L_i and the gradient is eq. 10's s_i A_i (1/|y_i|) sum_t grad log pi_t (unclipped).

    token_level=True (GSPO-token, sec. 4.3): s_it = sg[s_i] * pi_t / sg[pi_t] has the value s_i and
    d s_it / d log pi_t = s_i, with a per-token A_it; equal to GSPO in value and gradient when A is
    constant in the row. Clipping is decided per sequence (s_it = s_i), counted in tokens (`clipped`).
    The defaults eps 3e-4 / 4e-4 are the paper's (sec. 5.1); aggregation modes other than
    seq_mean_token_mean weight sequences by length, unlike the paper.
    """
    m = action_mask.to(log_probs.dtype)
    log_ratio = log_probs - old_log_probs
    log_s = sequence_log_ratio(log_probs, old_log_probs, action_mask)  # (B,)
    if token_level:
        log_s_tok = log_s.detach().unsqueeze(1) + log_probs - log_probs.detach()  # (B, A), value log s_i
        adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(log_probs)
    else:
        log_s_tok = log_s.unsqueeze(1).expand_as(log_probs)
        a_seq = advantages[:, 0] if advantages.dim() == 2 else advantages  # (B,)
        adv = a_seq.unsqueeze(1).expand_as(log_probs)
    loss, clipped = _clipped_surrogate(log_s_tok.exp(), adv, eps_low, eps_high, m)
    return PolicyLossOut(aggregate(_weighted(loss, weights), m, agg, norm_len), clipped, _approx_kl_sum(log_ratio, m))


def cispo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
               action_mask: torch.Tensor, *, eps_high: float, eps_low: float | None = None, agg: str = "token_mean",
               norm_len: float | None = None, weights: torch.Tensor | None = None) -> PolicyLossOut:
    """CISPO (MiniMax-M1, https://arxiv.org/abs/2506.13585, eq. 4-5): clip the IS weight, not the update:

        l_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_t * log pi(a_t),  r_t = pi(a_t) / pi_old(a_t)

    so every token keeps a gradient, -clip(r_t) A_t grad log pi_t, even where the weight is clipped.
    eps_low=None sets no lower bound (the paper: "we did not impose a lower bound ... by setting
    eps_low to a large value"). The loss *value* contains log pi, so it is not comparable with PPO's;
    only its gradient is meaningful. `clipped` counts tokens whose weight was clipped. (B, A) inputs.
    """
    m = action_mask.to(log_probs.dtype)
    log_ratio = log_probs - old_log_probs
    with torch.no_grad():
        ratio = log_ratio.exp()
        lo = 0.0 if eps_low is None else 1.0 - eps_low
        w = ratio.clamp(lo, 1.0 + eps_high)
        clipped = (((ratio > 1.0 + eps_high) | (ratio < lo)).to(m.dtype) * m).sum()
    loss = -w * advantages * log_probs
    return PolicyLossOut(aggregate(_weighted(loss, weights), m, agg, norm_len), clipped, _approx_kl_sum(log_ratio, m))


# ----------------------------------------------------------------------------------------------
# Generator / trainer mismatch
# ----------------------------------------------------------------------------------------------

def tis_weights(train_log_probs: torch.Tensor, gen_log_probs: torch.Tensor, mask: torch.Tensor, cap: float,
                level: Literal["token", "sequence"] = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling for the sampler/trainer mismatch (Yao et al. 2025, "Your Efficient
    RL Framework Secretly Brings You Off-Policy RL Training", https://fengyao.notion.site/off-policy-rl):

        token:     w_t = min(pi_train(a_t) / pi_gen(a_t), cap)
        sequence:  w_i = min(prod_t pi_train(a_t) / pi_gen(a_t), cap), the same for every token of row i

    The ratio is formed in log space and capped there (log w <= log cap), so a long sequence cannot
    overflow exp(). Returns (weights (B, A), detached, zero on padding; clip_fraction scalar = share of
    real tokens (token) or of non-empty sequences (sequence) where the cap was active).
    """
    if cap <= 0:
        raise ValueError(f"cap must be positive, got {cap}")
    with torch.no_grad():
        m = mask.float()
        log_r = (train_log_probs.detach().float() - gen_log_probs.float()) * m
        log_cap = math.log(cap)
        if level == "token":
            over, units = (log_r > log_cap).float() * m, m.sum()
            w = log_r.clamp(max=log_cap).exp() * m
        elif level == "sequence":
            seq = log_r.sum(1)  # (B,)
            real = (m.sum(1) > 0).float()
            over, units = (seq > log_cap).float() * real, real.sum()
            w = seq.clamp(max=log_cap).exp().unsqueeze(1) * m
        else:
            raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
        return w, over.sum() / units.clamp(min=1)


def mismatch_metrics(train_log_probs: torch.Tensor, gen_log_probs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """How far the generator's log-probs are from the trainer's on the same tokens (means over real tokens).

    Tokens are sampled from the generator, so with d = log pi_gen - log pi_train:
        gen_train_kl     k3 estimate of KL(gen || train): exp(-d) - 1 + d  (unbiased, >= 0; Schulman,
                         http://joschu.net/blog/kl-approx.html, with r = pi_train / pi_gen)
        gen_train_kl_k1  k1 estimate: d (unbiased, can be negative per token)
        max_abs_logprob_diff, mean_abs_logprob_diff: max and mean of |d|
    """
    with torch.no_grad():
        m = mask.bool()
        d = (gen_log_probs.float() - train_log_probs.detach().float())[m]
        if d.numel() == 0:
            return {"gen_train_kl": 0.0, "gen_train_kl_k1": 0.0, "max_abs_logprob_diff": 0.0,
                    "mean_abs_logprob_diff": 0.0}
        dc = d.clamp(-20.0, 20.0)  # as kl.kl_k3: one very unlikely token must not overflow exp()
        return {"gen_train_kl": float((torch.expm1(-dc) + dc).mean()), "gen_train_kl_k1": float(d.mean()),
                "max_abs_logprob_diff": float(d.abs().max()), "mean_abs_logprob_diff": float(d.abs().mean())}


# ----------------------------------------------------------------------------------------------
# DAPO: overlong shaping and dynamic sampling
# ----------------------------------------------------------------------------------------------

def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, https://arxiv.org/abs/2503.14476, eq. 13), times `penalty`:

        R(|y|) = 0                                   |y| <= max_len - buffer
                 ((max_len - buffer) - |y|) / buffer  max_len - buffer < |y| <= max_len
                 -1                                   max_len < |y|

    max_len is the generation cap (L_max), buffer the punishment cache (L_cache). (B,) -> (B,) float,
    to be added to the task reward.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    start = max_len - buffer
    over = (lengths.float() - start).clamp(min=0.0)
    return -penalty * (over / buffer).clamp(max=1.0)


def groups_with_signal(scores: torch.Tensor, n: int) -> torch.Tensor:
    """DAPO dynamic sampling (https://arxiv.org/abs/2503.14476, eq. 11: 0 < |{correct}| < G): True for
    groups of n consecutive rows whose scores are not all equal (exact comparison); those with equal
    scores give zero group-relative advantage. (B,) -> bool (B / n,); `.repeat_interleave(n)` for rows.
    """
    g = scores.view(-1, n)
    return g.amax(1) > g.amin(1)
