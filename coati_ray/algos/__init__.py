"""PPO/RLHF math as pure functions of tensors. No Ray, no engines, no config objects here."""
