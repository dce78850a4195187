#!/usr/bin/env python
"""Preference optimization (DPO, IPO, SimPO, ORPO, KTO): the same as `coati dpo`.

Usage and flags: coati_ray/commands/train_dpo.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.train_dpo", run_name="__main__", alter_sys=True)
