"""Learning-rate defaults by stage and model size (coati_ray/lr_defaults.py)."""

from __future__ import annotations

import pytest

from coati_ray.lr_defaults import LR, default_lr, lr_and_why


@pytest.mark.parametrize("n_params,tier", [(3_700_000, 0), (99_999_999, 0), (100_000_000, 1), (494_000_000, 1),
                                           (2_999_999_999, 1), (3_000_000_000, 2), (70_000_000_000, 2)])
def test_the_tier_follows_the_parameter_count(n_params, tier):
    for role, rates in LR.items():
        assert default_lr(role, n_params)[0] == rates[tier]


def test_a_small_model_trains_its_reward_model_at_the_rate_the_demo_measured():
    """The README's stage 1 -> 2 on the tiny preset: the RM starts from a --pretrain directory, and gets
    2e-4 (held-out accuracy 0.96 in the demo), not a 7B model's 5e-6 (0.56)."""
    lr, why = default_lr("rm", 3_690_000)
    assert lr == 2e-4
    assert why == "the rm default for a 3.7M-parameter model (under 100M parameters)"


def test_larger_models_get_lower_rates_in_every_role():
    for rates in LR.values():
        assert rates[0] > rates[1] >= rates[2]


def test_a_given_flag_wins_and_says_so():
    assert lr_and_why(5e-5, "sft", 10**9) == (5e-5, "from --lr")
    assert lr_and_why(None, "critic", 10**9, "--critic_lr") == (
        9e-6, "the critic default for a 1000.0M-parameter model (100M to 3B parameters); --critic_lr sets it")
    with pytest.raises(ValueError, match="no learning-rate default for 'actor'"):
        default_lr("actor", 10)
