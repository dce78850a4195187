"""The policy objectives and the generator/trainer mismatch correction in real PPO runs on a local Ray
(the formulas themselves are tested in tests/unit/test_objectives.py)."""

from __future__ import annotations

import math

import pytest

from coati_ray.pipelines.ppo import run_ppo
from coati_ray.ppo_config import PPOConfig


def ppo(micro_model, tmp_path, name: str, **kw):
    args = {"rm_path": micro_model, "experience_batch_size": 8, "n_samples_per_prompt": 2, "train_batch_size": 8,
            "max_new_tokens": 8, "max_steps": 2, "advantage_estimator": "grpo", "sync_check_interval": 0,
            "log_interval": 1000, "lr": 1e-3, "save_path": str(tmp_path / name), **kw}
    return run_ppo(PPOConfig.of(pretrain=micro_model, **args), progress=False)


@pytest.mark.parametrize("flags", [
    {"policy_loss": "gspo"},
    {"policy_loss": "cispo", "eps_clip_high": 0.28},
    {"eps_clip_low": 0.2, "eps_clip_high": 0.28, "loss_agg": "seq_mean_token_sum_norm",
     "advantage_estimator": "dr_grpo"},  # DAPO's clip-higher with Dr.GRPO's normalisation
], ids=["gspo", "cispo", "clip_higher_dr_grpo"])
def test_each_objective_trains(ray_cluster, micro_model, tmp_path, flags):
    r = ppo(micro_model, tmp_path, "run", **flags)
    assert len(r.history) == 2
    for m in r.history:
        assert math.isfinite(m["policy/loss"]) and m["policy/grad_norm"] > 0
        assert 0.0 <= m["policy/clipfrac"] <= 1.0
        # fp32 hf generator and fp32 trainer, on-policy: the same log-probs up to float noise
        assert m["rollout/logprob_diff_max"] < 1e-4 and abs(m["rollout/gen_train_kl"]) < 1e-6


def test_tis_bounds_the_weights_when_generator_and_trainer_disagree(ray_cluster, micro_model, tmp_path):
    """bf16 autocast in the trainer against the hf generator's own bf16 pass: the mismatch is visible,
    and with a cap of 1 TIS clips every token whose trainer probability is the higher; in fp32 there
    is nothing to correct."""
    fp32 = ppo(micro_model, tmp_path, "fp32", tis_cap=1.0)
    bf16 = ppo(micro_model, tmp_path, "bf16", tis_cap=1.0, dtype="bf16")
    for m in fp32.history:
        assert m["rollout/logprob_diff_max"] < 1e-4 and m["tis/clip_fraction"] <= 0.5
    for m in bf16.history:
        assert m["rollout/logprob_diff_max"] > 1e-3, m["rollout/logprob_diff_max"]
        assert 0.0 < m["tis/clip_fraction"] < 1.0 and m["rollout/gen_train_kl"] > 0


def test_reinforce_pp_whitens_over_the_step_and_overlong_shaping_is_part_of_the_score(ray_cluster, micro_model,
                                                                                        tmp_path):
    plain = ppo(micro_model, tmp_path, "rpp", advantage_estimator="reinforce_pp", n_samples_per_prompt=1,
                experience_batch_size=16)
    shaped = ppo(micro_model, tmp_path, "rppb", advantage_estimator="reinforce_pp_baseline", overlong_buffer=8,
                 overlong_penalty=0.5)
    for m in plain.history:
        assert math.isfinite(m["policy/loss"]) and m["policy/grad_norm"] > 0
    for m in shaped.history:
        # buffer = max_new_tokens = 8: every response loses 0.5 * length / 8 (DAPO eq. 13)
        assert m["reward/overlong"] == pytest.approx(-0.5 * m["response/length"] / 8, abs=1e-6)
        assert m["reward/mean"] == pytest.approx(m["reward/rm"] + m["reward/overlong"], abs=1e-5)


def test_dynamic_sampling_replaces_groups_without_signal_and_counts_them(ray_cluster, micro_model, tmp_path):
    """DAPO's dynamic sampling: a constant reward gives no group any signal, so every group is dropped
    at every try and the chunk keeps its first samples (all counted); a reward with signal for
    odd-numbered prompts only fills the step with groups that have it."""
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: how many?", "k": i}) + "\n"
                               for i in range(32)), encoding="utf-8")
    fn = tmp_path / "rewards.py"
    fn.write_text("def flat(prompts, responses, k, **_):\n    return [0.0] * len(prompts)\n\n"
                  "def odd(prompts, responses, k, **_):\n"
                  "    return [float(len(r) % 2) if i % 2 else 0.0 for r, i in zip(responses, k)]\n")
    common = {"prompt_dataset": str(prompts), "dynamic_sampling": True, "dynamic_sampling_tries": 2,
              "experience_batch_size": 4, "n_samples_per_prompt": 4, "train_batch_size": 16, "max_steps": 2,
              "rm_path": None, "temperature": 1.5}
    flat = ppo(micro_model, tmp_path, "flat", reward_fn=f"{fn}:flat", **common)
    for m in flat.history:  # 4 groups: dropped at the first try and at each of the 2 refills
        assert (m["dynamic/dropped_groups"], m["dynamic/extra_prompts"], m["dynamic/unfilled_groups"]) == (12, 8, 4)
    odd = ppo(micro_model, tmp_path, "odd", reward_fn=f"{fn}:odd", **common)
    for m in odd.history:
        # every dropped group was replaced by a drawn prompt, or is one of those kept unfilled
        assert m["dynamic/dropped_groups"] == m["dynamic/extra_prompts"] + m["dynamic/unfilled_groups"]
        assert m["reward/odd_std"] > 0  # what was kept has signal
    assert sum(m["dynamic/dropped_groups"] for m in odd.history) > 0
    assert sum(m["dynamic/unfilled_groups"] for m in odd.history) < 8  # most were filled with signal
    assert all(sorted(ids) == list(range(16 * s, 16 * s + 16)) for s, ids in enumerate(odd.made_ids))
