#!/usr/bin/env python
"""The whole pipeline on the embedded defaults: the same as `coati demo`.

Usage and flags: coati_ray/commands/demo.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.demo", run_name="__main__", alter_sys=True)
