"""PPO/RLHF math as pure functions of tensors. No Ray, no engines, no config objects here."""

# Which advantage estimator (advantages.py) needs a critic; here, without torch, for the driver's planning.
NEEDS_CRITIC = {"gae": True, "grpo": False, "rloo": False, "dr_grpo": False, "reinforce_pp": False,
                "reinforce_pp_baseline": False}
