"""Offline preference losses (coati_ray.algos.preference) against values worked out by hand with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from coati_ray.algos.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    simpo_loss,
)


def vec(*xs: float, grad: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# pi_c=-3, pi_r=-5, ref_c=ref_r=-4: h = (1) - (-1) = 2
PAIR = (-3.0, -5.0, -4.0, -4.0)


def pair(grad: bool = False, dtype: torch.dtype = torch.float64):
    pc, pr, rc, rr = PAIR
    return vec(pc, grad=grad, dtype=dtype), vec(pr, grad=grad, dtype=dtype), vec(rc, dtype=dtype), vec(rr, dtype=dtype)


def test_registry():
    assert PREFERENCE_LOSSES == ("dpo", "ipo", "simpo", "orpo", "kto")
    assert set(REFERENCE_FREE) == {"simpo", "orpo"}


# ---------------------------------------------------------------------------------------- DPO

def test_dpo_hand_value_and_rewards():
    loss, rc, rr = dpo_loss(*pair(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-12)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)


def test_cdpo_hand_value_and_zero_smoothing_is_dpo():
    loss, _, _ = dpo_loss(*pair(), beta=0.1, label_smoothing=0.25)
    assert loss.item() == pytest.approx(0.75 * softplus(-0.2) + 0.25 * softplus(0.2), rel=1e-12)
    plain, _, _ = dpo_loss(*pair(), beta=0.1)
    zero, _, _ = dpo_loss(*pair(), beta=0.1, label_smoothing=0.0)
    assert torch.equal(plain, zero)
    assert loss.item() > plain.item()  # smoothing penalises the confident, correct pair


def test_dpo_swapping_chosen_and_rejected_gives_minus_h():
    pc, pr, rc, rr = pair()
    swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta=0.1)
    assert swapped.item() == pytest.approx(softplus(0.2), rel=1e-12)  # -log sigmoid(-beta h)


def test_dpo_gradients_reach_the_policy_only():
    pc, pr, rc, rr = pair(grad=True)
    loss, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert not rew_c.requires_grad and not rew_r.requires_grad
    loss.sum().backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h)
    g = -0.1 * sigmoid(-0.2)
    assert pc.grad.item() == pytest.approx(g, rel=1e-12)
    assert pr.grad.item() == pytest.approx(-g, rel=1e-12)
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("h", [1000.0, -1000.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_large_margin_is_finite(h, eps):
    pc = vec(h, grad=True, dtype=torch.float32)
    zero = vec(0.0, dtype=torch.float32)
    loss, _, _ = dpo_loss(pc, zero, zero, zero, beta=1.0, label_smoothing=eps)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all()
    # -(1-eps) log sigmoid(h) - eps log sigmoid(-h) ~ (1-eps) max(0, -h) + eps max(0, h)
    assert loss.item() == pytest.approx((1 - eps) * max(0.0, -h) + eps * max(0.0, h), abs=1e-3)


# ---------------------------------------------------------------------------------------- IPO

def test_ipo_hand_value():
    loss, rc, rr = ipo_loss(*pair(), beta=0.1)
    assert loss.item() == pytest.approx((2 - 5) ** 2, rel=1e-12)  # 1/(2*0.1) = 5
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    loss2, _, _ = ipo_loss(*pair(), beta=0.5)  # target 1 -> (2 - 1)^2
    assert loss2.item() == pytest.approx(1.0, rel=1e-12)


def test_ipo_uses_summed_not_mean_logps_and_gradients():
    pc, pr, rc, rr = pair(grad=True)
    loss, rew_c, _ = ipo_loss(pc, pr, rc, rr, beta=0.1)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(2 * (2 - 5), rel=1e-12)  # d/dpi_c (h - 5)^2
    assert pr.grad.item() == pytest.approx(-2 * (2 - 5), rel=1e-12)
    assert rc.grad is None and not rew_c.requires_grad


def test_ipo_large_margin_is_finite():
    big = vec(1000.0, dtype=torch.float32)
    zero = vec(0.0, dtype=torch.float32)
    loss, _, _ = ipo_loss(big, zero, zero, zero, beta=0.1)
    assert loss.item() == pytest.approx((1000 - 5) ** 2)


# -------------------------------------------------------------------------------------- SimPO

def test_simpo_hand_value():
    # beta=2, gamma=0.5: 2*(-6/3) - 2*(-8/2) - 0.5 = -4 + 8 - 0.5 = 3.5
    pc, pr = vec(-6.0, grad=True), vec(-8.0, grad=True)
    loss, rc, rr = simpo_loss(pc, pr, vec(3.0), vec(2.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(softplus(-3.5), rel=1e-12)
    assert rc.item() == pytest.approx(-4.0) and rr.item() == pytest.approx(-8.0)
    assert not rc.requires_grad and not rr.requires_grad
    loss.sum().backward()
    # d/dpi_c = -sigmoid(-3.5) * beta/|y_w|
    assert pc.grad.item() == pytest.approx(-sigmoid(-3.5) * 2 / 3, rel=1e-12)
    assert pr.grad.item() == pytest.approx(sigmoid(-3.5) * 2 / 2, rel=1e-12)


def test_simpo_length_normalisation_matters():
    # same sums, longer chosen answer -> smaller chosen reward -> larger loss
    short, _, _ = simpo_loss(vec(-6.0), vec(-8.0), vec(3.0), vec(2.0), beta=2.0, gamma=0.5)
    long, _, _ = simpo_loss(vec(-6.0), vec(-8.0), vec(6.0), vec(2.0), beta=2.0, gamma=0.5)
    assert long.item() == pytest.approx(softplus(-(2 * -1 + 8 - 0.5)), rel=1e-12)
    assert long.item() < short.item()  # -2 + 8 - 0.5 = 5.5 > 3.5


# --------------------------------------------------------------------------------------- ORPO

def test_orpo_hand_value():
    # a_c = -1/2 = -0.5, a_r = -6/3 = -2
    odds_c = -0.5 - math.log(1 - math.exp(-0.5))
    odds_r = -2.0 - math.log(1 - math.exp(-2.0))
    pc, pr = vec(-1.0, grad=True), vec(-6.0, grad=True)
    loss, rc, rr, lor = orpo_loss(pc, pr, vec(2.0), vec(3.0), lam=0.1)
    assert loss.item() == pytest.approx(0.5 + 0.1 * softplus(-(odds_c - odds_r)), rel=1e-12)
    assert lor.item() == pytest.approx(odds_c - odds_r, rel=1e-12)
    assert rc.item() == pytest.approx(-0.5) and rr.item() == pytest.approx(-2.0)
    assert not (rc.requires_grad or rr.requires_grad or lor.requires_grad)
    loss.sum().backward()
    assert pc.grad is not None and pr.grad is not None and pr.grad.item() > 0  # pushes pi_r down


def test_orpo_lam_zero_is_sft_on_chosen():
    loss, _, _, _ = orpo_loss(vec(-1.0), vec(-6.0), vec(2.0), vec(3.0), lam=0.0)
    assert loss.item() == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a", [0.0, -1e-9])
def test_orpo_finite_when_mean_logp_reaches_zero(a, dtype):
    pc = vec(a, grad=True, dtype=dtype)
    pr = vec(-4.0, grad=True, dtype=dtype)
    one = vec(1.0, dtype=dtype)
    loss, rc, _, lor = orpo_loss(pc, pr, one, one, lam=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(lor).all()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert lor.item() > 10  # p_c ~ 1: very large (clamped) odds, not inf
    assert rc.item() == pytest.approx(a, abs=1e-12)  # reported reward is the unclamped mean log-prob


def test_orpo_very_negative_mean_logp_is_finite():
    loss, _, _, lor = orpo_loss(vec(-500.0, dtype=torch.float32), vec(-1.0, dtype=torch.float32),
                                vec(1.0, dtype=torch.float32), vec(1.0, dtype=torch.float32), lam=1.0)
    # log odds(-500) ~ -500; log odds(-1) = -1 - log(1 - e^-1)
    assert lor.item() == pytest.approx(-500.0 - (-1.0 - math.log(1 - math.exp(-1.0))), rel=1e-5)
    assert torch.isfinite(loss).all()


# ---------------------------------------------------------------------------------------- KTO

def test_kto_hand_values_desirable_and_undesirable():
    # r = [-3 - -4, -3 - -2] = [1, -1]; z0 = 0.5; beta = 0.5; lambda_D = 1, lambda_U = 2
    pi = vec(-3.0, -3.0, grad=True)
    ref = vec(-4.0, -2.0)
    kl = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    desirable = torch.tensor([True, False])
    loss, rewards = kto_loss(pi, ref, desirable, kl, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    want0 = 1.0 * (1 - sigmoid(0.5 * (1 - 0.5)))  # 1 - sigmoid(0.25)
    want1 = 2.0 * (1 - sigmoid(0.5 * (0.5 - -1)))  # 2 (1 - sigmoid(0.75))
    assert loss.tolist() == pytest.approx([want0, want1], rel=1e-12)
    assert rewards.tolist() == pytest.approx([0.5, -0.5]) and not rewards.requires_grad
    loss.sum().backward()
    assert kl.grad is None and ref.grad is None  # z0 is a constant
    # d/dr lambda (1 - sigmoid(beta m)): desirable m = r - z0, undesirable m = z0 - r
    s0, s1 = sigmoid(0.25), sigmoid(0.75)
    assert pi.grad.tolist() == pytest.approx([-0.5 * s0 * (1 - s0), 2.0 * 0.5 * s1 * (1 - s1)], rel=1e-12)


def test_kto_default_weights_and_flipping_desirability():
    pi, ref, kl = vec(-3.0), vec(-4.0), torch.tensor(0.0, dtype=torch.float64)
    good, _ = kto_loss(pi, ref, torch.tensor([True]), kl, beta=1.0)
    bad, _ = kto_loss(pi, ref, torch.tensor([False]), kl, beta=1.0)
    assert good.item() == pytest.approx(1 - sigmoid(1.0), rel=1e-12)
    assert bad.item() == pytest.approx(1 - sigmoid(-1.0), rel=1e-12)


def test_kto_kl_estimate():
    assert kto_kl_estimate(vec(-3.0, -5.0), vec(-4.0, -3.0)).item() == 0.0  # mean(1, -2) < 0 -> 0
    pi = vec(-3.0, -2.0, grad=True)
    z0 = kto_kl_estimate(pi, vec(-4.0, -4.0))  # mean(1, 2)
    assert z0.item() == pytest.approx(1.5, rel=1e-12)
    assert z0.dim() == 0 and not z0.requires_grad
