#!/usr/bin/env python
"""Scale, stop or inspect a running PPO job: the same as `coati control`.

Usage and flags: coati_ray/commands/control.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.control", run_name="__main__", alter_sys=True)
