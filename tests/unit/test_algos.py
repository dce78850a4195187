"""PPO/RLHF math in coati_ray.algos: hand-computed values, slow loop references, gradients.

Expected numbers are written out as plain float arithmetic (with the working in comments), never
by calling the function under test. The loop references below are per-row, per-token Python
implementations written from the papers' formulas, kept deliberately naive.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from coati_ray.algos import NEEDS_CRITIC
from coati_ray.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    gae,
    group_normalized_scores,
    kl_penalized_rewards,
    last_action_index,
    leave_one_out_scores,
    masked_whiten,
    normalize_scores,
)
from coati_ray.algos.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, token_kl
from coati_ray.algos.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from coati_ray.algos.logprobs import log_probs_from_logits, masked_mean
from coati_ray.algos.losses import (
    combine_actor_loss,
    entropy_from_logits,
    explained_variance,
    policy_loss,
    value_loss,
)

ATOL = dict(atol=1e-5, rtol=1e-5)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# ----------------------------------------------------------------------------------------------
# KL estimators and token_kl
# ----------------------------------------------------------------------------------------------

LOG_RATIO = [[0.0, 0.5, -1.0], [2.0, -0.25, 0.1]]


def test_kl_k1_is_the_log_ratio():
    assert_close(kl_k1(t(LOG_RATIO)), t(LOG_RATIO))


def test_kl_k2_is_half_the_squared_log_ratio():
    # 0.5 * x^2
    expected = [[0.0, 0.125, 0.5], [2.0, 0.03125, 0.005]]
    assert_close(kl_k2(t(LOG_RATIO)), t(expected), **ATOL)


def test_kl_k3_is_exp_minus_x_minus_one_plus_x():
    # exp(-x) - 1 + x
    expected = [[0.0, math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0],
                [math.exp(-2.0) - 1 + 2.0, math.exp(0.25) - 1 - 0.25, math.exp(-0.1) - 1 + 0.1]]
    assert_close(kl_k3(t(LOG_RATIO)), t(expected), **ATOL)


def test_kl_k2_and_k3_are_nonnegative_and_zero_only_at_zero():
    x = torch.cat([torch.linspace(-5, -0.1, 50), torch.zeros(1), torch.linspace(0.1, 5, 50)])
    for est in (kl_k2, kl_k3):
        v = est(x)
        assert (v >= 0).all()
        assert v[50].item() == 0.0  # x = 0
        assert (v[x != 0] > 0).all()


def test_kl_k3_clamps_extreme_log_ratios_to_finite_values():
    v = kl_k3(t([-1000.0, -30.0, 1000.0]))
    assert torch.isfinite(v).all()
    # clamped to -20 / +20: exp(20) - 1 - 20 and exp(-20) - 1 + 20
    assert v[0].item() == pytest.approx(math.exp(20.0) - 21.0, rel=1e-5)
    assert v[1].item() == v[0].item()
    assert v[2].item() == pytest.approx(math.exp(-20.0) + 19.0, rel=1e-6)


def test_kl_estimator_registry_names():
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_token_kl_uses_log_prob_difference_and_zeroes_padding(estimator):
    lp = t([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]])
    ref = t([[-1.5, -1.0, -7.0], [-0.3, -1.0, -3.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    # log_ratio = lp - ref = [[0.5, -1.0, 6.5(pad)], [0.0, -3.0, 2.0]]
    x = [[0.5, -1.0], [0.0, -3.0, 2.0]]
    f = {"k1": lambda v: v, "k2": lambda v: 0.5 * v * v, "k3": lambda v: math.exp(-v) - 1 + v}[estimator]
    expected = [[f(x[0][0]), f(x[0][1]), 0.0], [f(x[1][0]), f(x[1][1]), f(x[1][2])]]
    out = token_kl(lp, ref, mask, estimator)
    assert out.dtype == torch.float32
    assert_close(out, t(expected), **ATOL)


def test_token_kl_computes_in_float32_from_bf16_inputs():
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    ref = torch.tensor([[-1.5, -2.0]], dtype=torch.bfloat16)
    out = token_kl(lp, ref, torch.ones(1, 2), "k1")
    assert out.dtype == torch.float32
    assert_close(out, t([[0.5, 0.0]]))


def test_token_kl_unknown_estimator_raises():
    with pytest.raises(KeyError):
        token_kl(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "k4")


# ----------------------------------------------------------------------------------------------
# KL controllers
# ----------------------------------------------------------------------------------------------

def test_fixed_kl_controller_never_changes():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    c.update(0.0, 1000)
    assert c.value == 0.05


def test_adaptive_kl_controller_clips_error_above():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 100)  # err = 9/6 - 1 = 0.5 -> clipped to 0.2; value = 0.1 * (1 + 0.2 * 100 / 10000)
    assert c.value == pytest.approx(0.1 * 1.002)


def test_adaptive_kl_controller_clips_error_below():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(0.0, 100)  # err = -1 -> clipped to -0.2; value = 0.1 * (1 - 0.2 * 0.01)
    assert c.value == pytest.approx(0.1 * 0.998)


def test_adaptive_kl_controller_unclipped_error_and_compounding():
    c = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    c.update(6.6, 50)  # err = 0.1; factor = 1 + 0.1 * 50 / 1000 = 1.005
    assert c.value == pytest.approx(0.1 * 1.005)
    c.update(5.4, 50)  # err = -0.1; factor = 0.995
    assert c.value == pytest.approx(0.1 * 1.005 * 0.995)
    c.update(6.0, 50)  # err = 0 -> unchanged
    assert c.value == pytest.approx(0.1 * 1.005 * 0.995)


def test_kl_controller_state_dict_round_trip():
    a = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    a.update(20.0, 100)
    b = AdaptiveKLController(0.5, target=6.0, horizon=1000)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
    f = FixedKLController(0.3)
    f.load_state_dict({"value": 0.7})
    assert f.state_dict() == {"value": 0.7}


def test_make_kl_controller_picks_by_target():
    fixed = make_kl_controller(0.2, None, 10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.2
    adaptive = make_kl_controller(0.2, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 6.0, 10000)


# ----------------------------------------------------------------------------------------------
# Rewards, returns, advantages: hand-computed
# ----------------------------------------------------------------------------------------------

def test_last_action_index():
    mask = t([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert last_action_index(mask).tolist() == [1, 2, 0]


def test_kl_penalized_rewards_by_hand():
    score = t([1.0, -2.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    # coef 0.5: row 0 last token is col 1: [-0.05, -0.1 + 1.0, 0 (pad)]
    #           row 1 last token is col 2: [-0.2, -0.25, -0.3 - 2.0]
    expected = [[-0.05, -0.1 + 1.0, 0.0], [-0.2, -0.25, -0.3 - 2.0]]
    assert_close(kl_penalized_rewards(score, kl, mask, 0.5), t(expected), **ATOL)


def test_kl_penalized_rewards_zero_coef_is_score_on_last_token_only():
    out = kl_penalized_rewards(t([3.0]), t([[9.0, 9.0, 9.0, 9.0]]), t([[1, 1, 1, 0]]), 0.0)
    assert_close(out, t([[0.0, 0.0, 3.0, 0.0]]))


def test_gae_by_hand_with_one_padded_token():
    rewards = t([[1.0, 2.0, 3.0, 99.0]])
    values = t([[0.5, 1.0, 1.5, 77.0]])
    mask = t([[1, 1, 1, 0]])
    gamma, lam = 0.9, 0.8
    # V after the last real token is 0.
    d2 = 3.0 + 0.9 * 0.0 - 1.5  # 1.5
    d1 = 2.0 + 0.9 * 1.5 - 1.0  # 2.35
    d0 = 1.0 + 0.9 * 1.0 - 0.5  # 1.4
    a2 = d2  # 1.5
    a1 = d1 + 0.9 * 0.8 * a2  # 3.43
    a0 = d0 + 0.9 * 0.8 * a1  # 3.8696
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert_close(adv, t([[a0, a1, a2, 0.0]]), **ATOL)
    assert_close(ret, t([[a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0]]), **ATOL)


def test_gae_with_lambda_one_gamma_one_is_return_minus_value():
    rewards = t([[1.0, 2.0, 3.0]])
    values = t([[10.0, 20.0, 30.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # Monte Carlo returns 6, 5, 3
    assert_close(ret, t([[6.0, 5.0, 3.0]]), **ATOL)
    assert_close(adv, t([[6.0 - 10.0, 5.0 - 20.0, 3.0 - 30.0]]), **ATOL)


def test_discounted_returns_by_hand():
    rewards = t([[1.0, 2.0, 3.0, 99.0]])
    mask = t([[1, 1, 1, 0]])
    # gamma 0.5: G2 = 3, G1 = 2 + 0.5 * 3 = 3.5, G0 = 1 + 0.5 * 3.5 = 2.75
    assert_close(discounted_returns(rewards, mask, 0.5), t([[2.75, 3.5, 3.0, 0.0]]))
    # gamma 1: reversed cumulative sums 6, 5, 3
    assert_close(discounted_returns(rewards, mask), t([[6.0, 5.0, 3.0, 0.0]]))


def test_group_normalized_scores_groups_of_two():
    score = t([1.0, 3.0, 0.0, 10.0])
    # group (1, 3): mean 2, unbiased std sqrt(((-1)^2 + 1^2) / 1) = sqrt(2)
    # group (0, 10): mean 5, unbiased std sqrt((25 + 25) / 1) = sqrt(50)
    expected = [-1.0 / (math.sqrt(2) + 1e-6), 1.0 / (math.sqrt(2) + 1e-6),
                -5.0 / (math.sqrt(50) + 1e-6), 5.0 / (math.sqrt(50) + 1e-6)]
    assert_close(group_normalized_scores(score, 2), t(expected), **ATOL)


def test_group_normalized_scores_group_of_four_uses_unbiased_std():
    score = t([1.0, 2.0, 3.0, 6.0])
    # mean 3, deviations -2 -1 0 3, squares sum 14, unbiased var 14/3
    std = math.sqrt(14.0 / 3.0)
    expected = [-2.0 / std, -1.0 / std, 0.0, 3.0 / std]
    assert_close(group_normalized_scores(score, 4, eps=0.0), t(expected), **ATOL)


def test_group_normalized_scores_of_equal_scores_are_zero():
    out = group_normalized_scores(t([2.0, 2.0, 5.0, 5.0]), 2)
    assert_close(out, torch.zeros(4))


def test_leave_one_out_scores_groups_of_two():
    # n = 2: s_i - s_j
    score = t([1.0, 3.0, 0.0, 10.0])
    assert_close(leave_one_out_scores(score, 2), t([1.0 - 3.0, 3.0 - 1.0, 0.0 - 10.0, 10.0 - 0.0]))


def test_leave_one_out_scores_group_of_four():
    score = t([1.0, 2.0, 3.0, 6.0])
    # sum 12; s_i - (12 - s_i) / 3
    expected = [1.0 - 11.0 / 3, 2.0 - 10.0 / 3, 3.0 - 9.0 / 3, 6.0 - 6.0 / 3]
    assert_close(leave_one_out_scores(score, 4), t(expected), **ATOL)


def test_masked_whiten_by_hand():
    x = t([[1.0, 2.0, 3.0, 100.0], [5.0, -50.0, 7.0, 8.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # masked values 1 2 3 5: mean 2.75, deviations -1.75 -0.75 0.25 2.25,
    # squares 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75, unbiased var 8.75 / 3
    std = math.sqrt(8.75 / 3 + 1e-8)
    expected = [[-1.75 / std, -0.75 / std, 0.25 / std, 0.0], [2.25 / std, 0.0, 0.0, 0.0]]
    out = masked_whiten(x, mask)
    assert_close(out, t(expected), **ATOL)
    vals = out[mask.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-5)  # torch.std is unbiased


def test_masked_whiten_without_shifting_keeps_the_mean():
    x = t([[1.0, 2.0, 3.0, 100.0], [5.0, -50.0, 7.0, 8.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    std = math.sqrt(8.75 / 3 + 1e-8)
    expected = [[-1.75 / std + 2.75, -0.75 / std + 2.75, 0.25 / std + 2.75, 0.0],
                [2.25 / std + 2.75, 0.0, 0.0, 0.0]]
    assert_close(masked_whiten(x, mask, shift_mean=False), t(expected), **ATOL)


def test_normalize_scores_clip_only():
    score = t([1.0, 2.0, 3.0, -10.0])
    assert_close(normalize_scores(score, clip=2.5), t([1.0, 2.0, 2.5, -2.5]))


def test_normalize_scores_no_op_by_default():
    score = t([1.0, 2.0, 30.0])
    assert_close(normalize_scores(score), score)
    assert_close(normalize_scores(score, clip=0.0), score)


def test_normalize_scores_whitens_then_clips():
    score = t([1.0, 2.0, 3.0, 10.0])
    # mean 4, deviations -3 -2 -1 6, squares 50, unbiased std sqrt(50 / 3)
    std = math.sqrt(50.0 / 3.0)
    expected = [-3.0 / std, -2.0 / std, -1.0 / std, 6.0 / std]
    assert_close(normalize_scores(score, normalize=True), t(expected), **ATOL)
    # 6 / std = 1.47 -> clipped to 1.0; the others are within [-1, 1]
    expected_clipped = [-3.0 / std, -2.0 / std, -1.0 / std, 1.0]
    assert_close(normalize_scores(score, clip=1.0, normalize=True), t(expected_clipped), **ATOL)


def test_normalize_scores_single_element_is_not_whitened():
    assert_close(normalize_scores(t([7.0]), normalize=True), t([7.0]))


# ----------------------------------------------------------------------------------------------
# Losses: hand-computed
# ----------------------------------------------------------------------------------------------

# ratios, advantages, mask for the clipped-surrogate examples (eps = 0.2)
RATIOS = [[1.5, 0.5, 1.1], [1.5, 0.5, 0.7]]
ADVS = [[1.0, -2.0, 3.0], [-1.0, 1.0, -2.0]]
PL_MASK = [[1, 1, 1], [1, 1, 0]]
OLD_LP = [[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.0]]


def _policy_inputs(requires_grad=False):
    old = t(OLD_LP)
    lp = (old + torch.log(t(RATIOS))).detach().requires_grad_(requires_grad)
    return lp, old, t(ADVS), t(PL_MASK)


def test_policy_loss_by_hand():
    out = policy_loss(*_policy_inputs(), eps_clip=0.2)
    # (r=1.5, A=1):  surr1 1.5,  surr2 1.2*1  = 1.2  -> min 1.2,  loss -1.2, clipped
    # (r=0.5, A=-2): surr1 -1.0, surr2 0.8*-2 = -1.6 -> min -1.6, loss 1.6,  clipped
    # (r=1.1, A=3):  surr1 = surr2 = 3.3              -> loss -3.3, not clipped
    # (r=1.5, A=-1): surr1 -1.5, surr2 -1.2           -> min -1.5, loss 1.5, not clipped
    # (r=0.5, A=1):  surr1 0.5,  surr2 0.8            -> min 0.5,  loss -0.5, not clipped
    # (r=0.7, A=-2): would be clipped, but it is padding
    assert out.loss_sum.item() == pytest.approx(-1.2 + 1.6 - 3.3 + 1.5 - 0.5, abs=1e-5)
    assert out.clipped.item() == 2.0
    # approx_kl = sum over real tokens of r - 1 - log r
    kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 1.5, 0.5))
    assert out.approx_kl_sum.item() == pytest.approx(kl, abs=1e-5)


def test_policy_loss_at_ratio_one_is_minus_advantage_sum():
    adv = t([[0.3, -0.7, 2.0]])
    lp = t([[-1.0, -2.0, -3.0]])
    out = policy_loss(lp, lp.clone(), adv, torch.ones(1, 3))
    assert out.loss_sum.item() == pytest.approx(-(0.3 - 0.7 + 2.0), abs=1e-6)
    assert out.clipped.item() == 0.0
    assert out.approx_kl_sum.item() == 0.0


def test_policy_loss_wider_clip_range_clips_less():
    out = policy_loss(*_policy_inputs(), eps_clip=0.6)
    # eps 0.6: range [0.4, 1.6] contains every ratio -> loss is -sum(r * A) over real tokens
    expected = -(1.5 * 1.0 + 0.5 * -2.0 + 1.1 * 3.0 + 1.5 * -1.0 + 0.5 * 1.0)
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-5)
    assert out.clipped.item() == 0.0


def _value_inputs(requires_grad=False):
    # token 0: V=1.0 Vold=0.5 R=2.0 -> unclipped (1-2)^2 = 1, V_clip = 0.7 -> (0.7-2)^2 = 1.69 (clipped wins)
    # token 1: V=1.0 Vold=0.5 R=0.0 -> unclipped 1,           V_clip = 0.7 -> 0.49        (unclipped wins)
    # token 2: V=0.1 Vold=0.0 R=1.0 -> within clip: both 0.81
    # token 3: padding
    values = t([[1.0, 1.0, 0.1, 5.0]]).requires_grad_(requires_grad)
    old = t([[0.5, 0.5, 0.0, 0.0]])
    returns = t([[2.0, 0.0, 1.0, -5.0]])
    mask = t([[1, 1, 1, 0]])
    return values, old, returns, mask


def test_value_loss_clipped_by_hand():
    loss, frac = value_loss(*_value_inputs(), value_clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.81), abs=1e-5)
    assert frac.item() == 1.0


@pytest.mark.parametrize("clip", [None, 0.0])
def test_value_loss_unclipped_is_half_squared_error_sum(clip):
    loss, frac = value_loss(*_value_inputs(), value_clip=clip)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0 + 0.81), abs=1e-5)
    assert frac.item() == 0.0


def test_entropy_of_uniform_logits_is_log_vocab():
    logits = torch.full((2, 3, 5), 0.7)
    assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(5.0)))


def test_entropy_by_hand_and_of_a_peaked_distribution():
    # logits [0, ln 3] -> p = [1/4, 3/4]
    logits = t([[[0.0, math.log(3.0)], [0.0, 100.0]]])
    h = entropy_from_logits(logits)
    assert h[0, 0].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_is_float32_for_half_logits():
    assert entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_explained_variance_perfect_critic_is_one():
    returns = t([[1.0, 2.0, 4.0, 0.0]])
    values = t([[1.0, 2.0, 4.0, 123.0]])  # garbage on padding must not count
    assert explained_variance(values, returns, t([[1, 1, 1, 0]])) == pytest.approx(1.0)


def test_explained_variance_constant_mean_critic_is_zero():
    returns = t([[1.0, 2.0, 6.0, 50.0]])
    values = t([[3.0, 3.0, 3.0, -7.0]])  # the masked mean of returns is 3
    assert explained_variance(values, returns, t([[1, 1, 1, 0]])) == pytest.approx(0.0, abs=1e-12)


def test_explained_variance_by_hand():
    returns = t([[0.0, 2.0]])
    values = t([[1.0, 1.0]])  # residual (-1, 1): var 2; var(R) = 2 -> 0
    assert explained_variance(values, returns, torch.ones(1, 2)) == pytest.approx(0.0, abs=1e-12)
    values = t([[0.5, 2.0]])  # residual (-0.5, 0): var 0.125; var(R) 2 -> 1 - 0.0625
    assert explained_variance(values, returns, torch.ones(1, 2)) == pytest.approx(1 - 0.125 / 2.0)


def test_explained_variance_degenerate_is_nan():
    assert math.isnan(explained_variance(t([[1.0, 2.0]]), t([[1.0, 2.0]]), t([[1, 0]])))  # one token
    assert math.isnan(explained_variance(t([[1.0, 2.0]]), t([[3.0, 3.0]]), t([[1, 1]])))  # Var(R) = 0


def test_combine_actor_loss_with_ptx():
    # (1 - 0.25) * 2 + 0.25 * 4 = 2.5
    out = combine_actor_loss(t(2.0), t(4.0), 0.25)
    assert out.item() == pytest.approx(2.5)


def test_combine_actor_loss_subtracts_entropy_bonus():
    # 2.5 - 0.1 * 3 = 2.2
    out = combine_actor_loss(t(2.0), t(4.0), 0.25, entropy=t(3.0), entropy_coef=0.1)
    assert out.item() == pytest.approx(2.2)


def test_combine_actor_loss_without_ptx_is_the_policy_loss_unscaled():
    assert combine_actor_loss(t(2.0), None, 0.25).item() == pytest.approx(2.0)
    assert combine_actor_loss(t(2.0), None, 0.25, entropy=t(3.0), entropy_coef=0.5).item() == pytest.approx(0.5)
    assert combine_actor_loss(t(2.0), None, 0.25, entropy=t(3.0), entropy_coef=0.0).item() == pytest.approx(2.0)


# ----------------------------------------------------------------------------------------------
# logprobs helpers
# ----------------------------------------------------------------------------------------------

def test_masked_mean_by_hand():
    x = t([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1.0 + 2.0 + 4.0) / 3)
    assert_close(masked_mean(x, mask, dim=1), t([1.5, 4.0]))


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    assert masked_mean(t([[5.0, 6.0]]), t([[0, 0]])).item() == 0.0
    assert_close(masked_mean(t([[5.0, 6.0]]), t([[0, 0]]), dim=1), t([0.0]))


def test_log_probs_from_logits_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g) * 5
    labels = torch.randint(0, 11, (3, 4), generator=g)
    lp = log_probs_from_logits(logits, labels)
    for b in range(3):
        for i in range(4):
            row = [float(v) for v in logits[b, i]]
            lse = math.log(sum(math.exp(v) for v in row))
            assert lp[b, i].item() == pytest.approx(row[labels[b, i]] - lse, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Slow loop references vs the vectorised functions
# ----------------------------------------------------------------------------------------------

B, A = 8, 7


def _random_batch(seed, B=B, A=A):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, A + 1, (B,), generator=g)
    mask = (torch.arange(A).unsqueeze(0) < lengths.unsqueeze(1)).float()
    # Garbage (large) values everywhere: padding positions must be ignored by every function.

    def rand():
        return torch.randn(B, A, generator=g) * 2

    return dict(g=g, mask=mask, lengths=[int(n) for n in lengths], rewards=rand(), values=rand(), kl=rand(),
                score=torch.randn(B, generator=g) * 3, log_probs=rand() * 0.3 - 1.0, old_log_probs=rand() * 0.3 - 1.0,
                advantages=rand())


def loop_gae(rewards, values, lengths, gamma, lam):
    adv = [[0.0] * len(r) for r in rewards]
    ret = [[0.0] * len(r) for r in rewards]
    for b in range(len(rewards)):
        L = lengths[b]
        running = 0.0
        for i in reversed(range(L)):
            next_v = values[b][i + 1] if i + 1 < L else 0.0
            delta = rewards[b][i] + gamma * next_v - values[b][i]
            running = delta + gamma * lam * running
            adv[b][i] = running
            ret[b][i] = running + values[b][i]
    return adv, ret


def loop_discounted_returns(rewards, lengths, gamma):
    out = [[0.0] * len(r) for r in rewards]
    for b in range(len(rewards)):
        for i in range(lengths[b]):
            out[b][i] = sum(gamma ** (k - i) * rewards[b][k] for k in range(i, lengths[b]))
    return out


def loop_grpo(score, n, eps=1e-6):
    out = []
    for start in range(0, len(score), n):
        grp = score[start:start + n]
        mean = sum(grp) / n
        std = math.sqrt(sum((s - mean) ** 2 for s in grp) / (n - 1))
        out += [(s - mean) / (std + eps) for s in grp]
    return out


def loop_rloo(score, n):
    out = []
    for start in range(0, len(score), n):
        grp = score[start:start + n]
        for i, s in enumerate(grp):
            others = [grp[j] for j in range(n) if j != i]
            out.append(s - sum(others) / len(others))
    return out


def loop_rewards(score, kl, lengths, coef):
    out = [[0.0] * len(k) for k in kl]
    for b in range(len(kl)):
        for i in range(lengths[b]):
            out[b][i] = -coef * kl[b][i]
        out[b][lengths[b] - 1] += score[b]
    return out


def loop_estimator(name, score, kl, values, lengths, coef, n, gamma, lam):
    if name == "gae":
        return loop_gae(loop_rewards(score, kl, lengths, coef), values, lengths, gamma, lam)
    shaped = loop_grpo(score, n) if name == "grpo" else loop_rloo(score, n)
    ret = loop_discounted_returns(loop_rewards(shaped, kl, lengths, coef), lengths, gamma)
    return ret, ret


def loop_policy_loss(lp, old, adv, lengths, eps):
    loss, clipped, kl = 0.0, 0, 0.0
    for b in range(len(lp)):
        for i in range(lengths[b]):
            r = math.exp(lp[b][i] - old[b][i])
            s1 = r * adv[b][i]
            s2 = min(max(r, 1 - eps), 1 + eps) * adv[b][i]
            loss += -min(s1, s2)
            clipped += s2 < s1
            kl += r - 1 - math.log(r)
    return loss, clipped, kl


def L(x):
    return x.tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)])
def test_gae_matches_loop(seed, gamma, lam):
    d = _random_batch(seed)
    adv, ret = gae(d["rewards"], d["values"], d["mask"], gamma, lam)
    ref_adv, ref_ret = loop_gae(L(d["rewards"]), L(d["values"]), d["lengths"], gamma, lam)
    assert_close(adv, t(ref_adv), **ATOL)
    assert_close(ret, t(ref_ret), **ATOL)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_match_loop(seed, gamma):
    d = _random_batch(seed)
    out = discounted_returns(d["rewards"], d["mask"], gamma)
    assert_close(out, t(loop_discounted_returns(L(d["rewards"]), d["lengths"], gamma)), **ATOL)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [2, 4, 8])
def test_group_normalized_scores_match_loop(seed, n):
    score = _random_batch(seed)["score"]
    assert_close(group_normalized_scores(score, n), t(loop_grpo(L(score), n)), **ATOL)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [2, 4, 8])
def test_leave_one_out_scores_match_loop(seed, n):
    score = _random_batch(seed)["score"]
    assert_close(leave_one_out_scores(score, n), t(loop_rloo(L(score), n)), **ATOL)


@pytest.mark.parametrize("seed", range(4))
def test_kl_penalized_rewards_match_loop(seed):
    d = _random_batch(seed)
    out = kl_penalized_rewards(d["score"], d["kl"], d["mask"], 0.07)
    assert_close(out, t(loop_rewards(L(d["score"]), L(d["kl"]), d["lengths"], 0.07)), **ATOL)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["gae", "grpo", "rloo"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_advantage_estimator_pipeline_matches_loop(seed, name, gamma, lam):
    d = _random_batch(seed)
    n, coef = 4, 0.05
    adv, ret = ADVANTAGE_ESTIMATORS[name](d["score"], d["kl"], d["mask"], coef, values=d["values"],
                                          n_samples_per_prompt=n, gamma=gamma, lam=lam)
    ref_adv, ref_ret = loop_estimator(name, L(d["score"]), L(d["kl"]), L(d["values"]), d["lengths"],
                                      coef, n, gamma, lam)
    assert_close(adv, t(ref_adv), **ATOL)
    assert_close(ret, t(ref_ret), **ATOL)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_critic_free_estimators_ignore_values(name):
    d = _random_batch(0)
    a1, r1 = ADVANTAGE_ESTIMATORS[name](d["score"], d["kl"], d["mask"], 0.1, values=None, n_samples_per_prompt=2)
    a2, r2 = ADVANTAGE_ESTIMATORS[name](d["score"], d["kl"], d["mask"], 0.1, values=d["values"],
                                        n_samples_per_prompt=2)
    assert_close(a1, a2)
    assert_close(r1, r2)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_policy_loss_matches_loop(seed, eps):
    d = _random_batch(seed)
    out = policy_loss(d["log_probs"], d["old_log_probs"], d["advantages"], d["mask"], eps)
    loss, clipped, kl = loop_policy_loss(L(d["log_probs"]), L(d["old_log_probs"]), L(d["advantages"]),
                                         d["lengths"], eps)
    assert clipped > 0  # the random ratios do exercise the clipping
    assert out.loss_sum.item() == pytest.approx(loss, abs=1e-4)
    assert out.clipped.item() == clipped
    assert out.approx_kl_sum.item() == pytest.approx(kl, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

def test_policy_loss_gradient_is_zero_where_clipping_is_active():
    lp, old, adv, mask = _policy_inputs(requires_grad=True)
    policy_loss(lp, old, adv, mask, eps_clip=0.2).loss_sum.backward()
    # d(-r*A)/d log_prob = -r*A where the unclipped term is active; 0 where clipped or padding.
    # (1.5, +1) clipped; (0.5, -2) clipped; (1.1, 3) -> -3.3
    # (1.5, -1) -> 1.5; (0.5, 1) -> -0.5; padding -> 0
    expected = [[0.0, 0.0, -1.1 * 3.0], [1.5, -0.5, 0.0]]
    assert_close(lp.grad, t(expected), **ATOL)


@pytest.mark.parametrize("seed", range(3))
def test_policy_loss_gradient_is_zero_exactly_on_clipped_tokens(seed):
    d = _random_batch(seed)
    lp = d["log_probs"].clone().requires_grad_(True)
    eps = 0.1
    policy_loss(lp, d["old_log_probs"], d["advantages"], d["mask"], eps).loss_sum.backward()
    r = (d["log_probs"] - d["old_log_probs"]).exp()
    adv = d["advantages"]
    clipped = ((r > 1 + eps) & (adv > 0)) | ((r < 1 - eps) & (adv < 0))
    real = d["mask"].bool()
    assert (clipped & real).any() and (~clipped & real).any()
    assert (lp.grad[clipped | ~real] == 0).all()
    assert (lp.grad[~clipped & real] != 0).all()
    assert_close(lp.grad[~clipped & real], (-r * adv)[~clipped & real], **ATOL)


def test_value_loss_gradient_is_zero_where_clipped_term_dominates():
    values, old, returns, mask = _value_inputs(requires_grad=True)
    loss, _ = value_loss(values, old, returns, mask, value_clip=0.2)
    loss.backward()
    # token 0: clipped term active, V - Vold outside the clip range -> 0
    # token 1: unclipped active -> d 0.5 (V-R)^2 / dV = V - R = 1.0
    # token 2: both equal and inside the range -> V - R = -0.9
    # token 3: padding -> 0
    assert_close(values.grad, t([[0.0, 1.0, -0.9, 0.0]]), **ATOL)


def test_unclipped_value_loss_gradient_is_the_error():
    values, old, returns, mask = _value_inputs(requires_grad=True)
    loss, _ = value_loss(values, old, returns, mask, value_clip=None)
    loss.backward()
    assert_close(values.grad, t([[1.0 - 2.0, 1.0 - 0.0, 0.1 - 1.0, 0.0]]), **ATOL)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

def test_gae_estimator_needs_values():
    d = _random_batch(0)
    with pytest.raises(ValueError):
        ADVANTAGE_ESTIMATORS["gae"](d["score"], d["kl"], d["mask"], 0.1, values=None)


def test_needs_critic_covers_exactly_the_estimators():
    assert set(NEEDS_CRITIC) == set(ADVANTAGE_ESTIMATORS)
    assert NEEDS_CRITIC == {"gae": True, "grpo": False, "rloo": False, "dr_grpo": False, "reinforce_pp": False,
                            "reinforce_pp_baseline": False}

