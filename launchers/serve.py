#!/usr/bin/env python
"""The OpenAI-compatible server and chat page: the same as `coati serve`.

Usage and flags: coati_ray/commands/serve.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.serve", run_name="__main__", alter_sys=True)
