#!/usr/bin/env python
"""Run Prometheus over the Ray cluster's metrics (ray_coati_*): the same as `coati prometheus`.

Usage and flags: coati_ray/commands/prometheus.py, or --help.
"""

import runpy

runpy.run_module("coati_ray.commands.prometheus", run_name="__main__", alter_sys=True)
