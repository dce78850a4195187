"""A launcher's embedded Ray: it listens on loopback only, and it does not outlive a SIGKILL.

One real launcher (train_sft.py, micro preset, CPU, training until killed) serves both tests, in
file order: the first checks the listening sockets of its whole process tree, the second SIGKILLs
it and waits for every process of its Ray session to be gone (coati_ray/cluster/reaper.py). Before
the watcher, Ray's DashboardAgent and RuntimeEnvAgent lived on for about 61 s.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from coati_ray.cluster.reaper import LOG_NAME, session_processes

ROOT = Path(__file__).resolve().parents[2]
SESSION_LINE = re.compile(r"local Ray session (\S+) listens on ([^\s;]+)")

# Listeners of the embedded Ray that Ray 2.60 cannot bind to loopback: none. Once the node's IP is
# 127.0.0.1 (ray_env._start_local), the GCS, raylet, workers, driver, agents and metrics exporters
# all listen there; so do the two trainers' c10d store and gloo connections (workers/rank.py). An
# entry would be: process name -> why it cannot.
NOT_LOOPBACK_ALLOWED: dict[str, str] = {}


@dataclass
class Launcher:
    proc: subprocess.Popen
    session: str
    log: Path


def wait_for(check, timeout_s: float, what: str, launcher: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until it returns something truthy; fail after `timeout_s` saying `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        if launcher is not None and launcher.poll() is not None:
            pytest.fail(f"the launcher exited ({launcher.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout_s:.0f} s:\n{tail}")
        time.sleep(0.2)


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {p.name()} [{' '.join(p.cmdline())[:100]}]"
    except psutil.Error:
        return f"{p.pid} (gone)"


def ray_dir() -> str:
    import ray

    return os.path.dirname(os.path.abspath(ray.__file__))


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedded_ray")
    log = tmp / "launcher.log"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false", HOME=str(tmp / "home"))
    args = ["--preset_size", "micro", "--max_steps", "1000000", "--max_epochs", "100000", "--log_interval", "1000000",
            "--trainers", "2", "--save_path", str(tmp / "sft")]  # two: their torch.distributed group listens too
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launchers" / "train_sft.py"), *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        m = wait_for(lambda: SESSION_LINE.search(log.read_text(errors="replace")), 150,
                     "'local Ray session ... listens on' line", proc, log)
        assert m.group(2) == "127.0.0.1", m.group(0)
        yield Launcher(proc, m.group(1), log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return getattr(addr, "ipv4_mapped", None) is not None and addr.ipv4_mapped.is_loopback or addr.is_loopback


def _is_watcher_of(cmdline: list[str], pid: int) -> bool:
    return len(cmdline) > 3 and Path(cmdline[2]).name == "reaper.py" and cmdline[3] == str(pid)


def _listeners(root: psutil.Process) -> list[tuple[int, str, str, int]]:
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            name, conns = p.name(), p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found += [(p.pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_embedded_ray_listens_on_loopback_only(launcher):
    root = psutil.Process(launcher.proc.pid)
    expected = {  # the listeners a running embedded Ray has (Ray 2.60), as (what, test on (pid, name))
        "driver core worker": lambda pid, name: pid == root.pid,
        "GCS": lambda pid, name: name == "gcs_server",
        "raylet": lambda pid, name: name == "raylet",
        "dashboard agent": lambda pid, name: name == "ray::DashboardAgent",
        "runtime env agent": lambda pid, name: name == "ray::RuntimeEnvAgent",
        "a worker": lambda pid, name: name.startswith("ray::") and "Agent" not in name,
        "trainer rank 0's rendezvous store": lambda pid, name: name.startswith("ray::TrainerWorker"),
    }

    def all_up():
        found = _listeners(root)
        return found if all(any(ok(pid, name) for pid, name, _, _ in found) for ok in expected.values()) else None

    found = wait_for(all_up, 60, f"listening socket of each of {sorted(expected)}", launcher.proc, launcher.log)
    exposed = [f"{name} (pid {pid}) on {ip}:{port}" for pid, name, ip, port in found
               if not _loopback(ip) and name not in NOT_LOOPBACK_ALLOWED]
    assert not exposed, f"the embedded Ray listens beyond loopback: {exposed}"

    # What the watcher would end: this session's processes, all of them inside the launcher's tree
    # (never the test suite's own Ray, nor anything else on this machine), agents included.
    tree = {p.pid for p in root.children(recursive=True)}
    ended = session_processes(psutil, launcher.session, ray_dir())
    tree |= {p.pid for p in root.children(recursive=True)}  # a worker may start meanwhile
    assert {p.pid for p in ended} <= tree, [describe(p) for p in ended if p.pid not in tree]
    names = {p.name() for p in ended if running(p)}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names


def test_sigkill_of_the_launcher_ends_its_embedded_ray(launcher):
    root = psutil.Process(launcher.proc.pid)
    tree = root.children(recursive=True)
    watchers = [p for p in psutil.process_iter(["cmdline"]) if _is_watcher_of(p.info["cmdline"] or [], root.pid)]
    assert len(watchers) == 1, "expected one watcher for the launcher's embedded Ray"
    # This test process's own Ray (tests/conftest.py ray_cluster), if it runs one, must not be touched.
    mine = {q.pid for q in tree} | {root.pid}
    others = [p for p in psutil.Process().children(recursive=True)
              if p.pid not in mine and running(p) and p.name() in ("gcs_server", "raylet")]

    launcher.proc.kill()
    launcher.proc.wait(timeout=30)
    start = time.monotonic()

    def survivors():
        left = [p for p in tree + watchers if running(p)]
        return left + [p for p in session_processes(psutil, launcher.session, ray_dir()) if p not in left]

    deadline = start + 30
    while (left := survivors()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running {time.monotonic() - start:.0f} s after the SIGKILL: {[describe(p) for p in left]}"
    assert all(running(p) for p in others), [describe(p) for p in others if not running(p)]
    report = Path(launcher.session, "logs", LOG_NAME).read_text()
    assert f"the launcher exited (launcher pid {root.pid})" in report, report
