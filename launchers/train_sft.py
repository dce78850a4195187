#!/usr/bin/env python
"""Stage 1: supervised fine-tuning: the same as `coati sft`.

Usage and flags: coati_ray/commands/train_sft.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.train_sft", run_name="__main__", alter_sys=True)
