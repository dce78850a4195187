#!/usr/bin/env python
"""Stage 2: the reward model: the same as `coati rm`.

Usage and flags: coati_ray/commands/train_reward_model.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.train_reward_model", run_name="__main__", alter_sys=True)
