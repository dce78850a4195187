"""Peak PSS of a process tree, by role: what the benchmarks (scripts/bench_peer.py, bench_dpo.py) report
as a run's memory (Ray's daemons and every actor process included). psutil is imported lazily."""

from __future__ import annotations

import threading
from typing import Any

ROLE_NAMES = {"GeneratorWorker": "generator", "ReferenceWorker": "reference", "RewardWorker": "reward",
              "CriticWorker": "critic", "PolicyWorker": "trainer", "HybridWorker": "trainer (every role)",
              "ReplayBuffer": "buffer", "JobBuffer": "buffer (and control)"}


def role_of(proc) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return "other"
    if "ray::" in cmd:
        if "ray::DashboardAgent" in cmd or "ray::RuntimeEnvAgent" in cmd:
            return "ray daemons"
        for cls, role in ROLE_NAMES.items():
            if f"ray::{cls}" in cmd:
                return role
        return "ray worker (idle)"
    # Ray's own programs, by path (a driver's flags, e.g. --no_dashboard, must not match)
    for daemon in ("/raylet", "/gcs_server", "ray/dashboard/", "ray-dashboard", "ray.dashboard", "log_monitor.py",
                   "runtime_env/", "monitor.py"):
        if daemon in cmd:
            return "ray daemons"
    return "driver"


class TreeMemory:
    """Peak PSS (MB) of a process and all its descendants, sampled in a thread every `every_s` (reading
    every process's smaps costs CPU: at 0.25 s the sampler took 22% of a core beside an 11 GB peer)."""

    def __init__(self, pid: int, every_s: float = 1.0):
        import psutil

        self.root, self.every_s = psutil.Process(pid), every_s
        self.peak_mb, self.peak_roles, self.peak_procs, self.samples = 0.0, {}, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TreeMemory:
        self._thread.start()
        return self

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total, roles = 0.0, {}
        for p in procs:
            try:
                mb = p.memory_full_info().pss / 2**20
            except psutil.Error:
                continue
            total += mb
            r = role_of(p)
            roles[r] = roles.get(r, 0.0) + mb
        self.samples += 1
        if total > self.peak_mb:
            self.peak_mb, self.peak_roles, self.peak_procs = total, roles, len(procs)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=10)
        return {"peak_pss_mb": round(self.peak_mb, 1), "processes_at_peak": self.peak_procs,
                "pss_by_role_mb": {k: round(v, 1) for k, v in sorted(self.peak_roles.items())},
                "memory_samples": self.samples}
