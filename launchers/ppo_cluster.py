#!/usr/bin/env python
"""Stage 3: PPO (+PTX) on Ray actors: the same as `coati ppo`.

Usage and flags: coati_ray/commands/ppo_cluster.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.ppo_cluster", run_name="__main__", alter_sys=True)
