"""Drivers' loops: stage 1 (SFT), stage 2 (reward model) and, later, stage 3 (PPO)."""
