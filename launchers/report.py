#!/usr/bin/env python
"""Draw a run's curves into RUN_DIR/report.png and report.html: the same as `coati report`.

Usage and flags: coati_ray/commands/report.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.report", run_name="__main__", alter_sys=True)
