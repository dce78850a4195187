"""End an embedded Ray's processes when the process that started it ends, however it ends.

`ray.init()` without an address starts a private Ray (GCS, raylet, dashboard, agents, workers)
under the launcher. Ray starts the GCS and the raylet with PR_SET_PDEATHSIG, so they die with the
launcher, but the raylet's DashboardAgent and RuntimeEnvAgent only notice that their raylet is gone
and then block for about a minute reporting it to the dead GCS before they exit (Ray 2.60:
`ray/_private/process_watcher.py`; measured: 61 s after a SIGKILL of the launcher).

`start()`, called before `ray.init`, spawns this file as a watcher: a plain Python process (stdlib
and psutil; no Ray, no torch) in its own session, child of nobody. Its stdin is the read end of a
pipe whose only write end the launcher holds, so end of file means the launcher is gone: a normal
exit, an exception, a SIGKILL, the OOM killer (no polling). `Reaper.attach(node)`, after `ray.init`,
sends it the session directory and the pids of the processes `ray.init` started. The watcher then
waits for whichever comes first: end of file, or all of those having exited while the launcher goes
on (`ray.shutdown()` in a long-lived process, e.g. pytest; Linux pidfds). Then it ends the
processes of exactly that Ray session (SIGTERM, then SIGKILL after `GRACE_S`), writes what it did to
`<session>/logs/coati_reaper.log` and exits, silently. If the launcher dies inside `ray.init`, the
session is the one named after the launcher's pid and started after the watcher.

A process belongs to the session when it is ours (same uid), is a Ray process (named `ray::...` or
`ray-dashboard-...`, or runs Ray's binaries or a Python interpreter), and holds a file open under
`<session>/` or names that directory in its command line (every Ray process does one or the other:
its logs are there; an agent's command line is overwritten by its title, its logs are not). Its
descendants at that moment come too (what actors started, the dashboard's forkserver). Drivers
(processes with a `python-core-driver-*` log open: the launcher itself, or a script that joined
this Ray) are never ended, nor is anything outside the session: another Ray on the same machine
has another session directory.
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from datetime import datetime

logger = logging.getLogger(__name__)

GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long
LOG_NAME = "coati_reaper.log"
_SESSION_NAME = re.compile(r"^session_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6})_(\d+)$")
_REAPERS: list[Reaper] = []  # keeps the write ends for the life of the process


class Reaper:
    """The launcher's end of the pipe to one watcher."""

    def __init__(self, fd: int, watcher_pid: int | None):
        self._fd = fd
        self.watcher_pid = watcher_pid
        # A child forked without exec (a DataLoader worker, multiprocessing "fork") must not hold
        # the write end, or the watcher would wait for it too.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def send(self, line: str) -> bool:
        if self._fd < 0:
            return False
        try:
            os.write(self._fd, (line + "\n").encode())
            return True
        except OSError as e:  # the watcher is gone (EPIPE): nothing will clean up after us
            logger.warning("the embedded Ray's watcher is gone (%s): its processes may outlive this one", e)
            return False

    def attach(self, node) -> None:
        """Tell the watcher which session to end: `node` is `ray._private.worker._global_node`.

        The processes `ray.init` started itself (GCS, raylet, dashboard, monitors) are the heads:
        once all of them have exited, `ray.shutdown()` is done and the watcher ends what is left.
        """
        self.send(f"session {node.get_session_dir_path()}")
        for infos in node.all_processes.values():
            for info in infos:
                self.send(f"head {info.process.pid}")

    def close(self) -> None:
        """End of file for the watcher: it ends the session now (or what a failed `ray.init` left)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self in _REAPERS:
            _REAPERS.remove(self)


def start() -> Reaper | None:
    """Spawn a watcher for the Ray this process is about to start; None (and a warning) if it cannot."""
    if not hasattr(os, "fork"):  # Windows: no watcher
        return None
    import psutil  # Ray's dependency (also vendored under ray/thirdparty_files)
    import ray
    from ray._common.utils import get_default_ray_temp_dir

    r, w = os.pipe()  # both ends close-on-exec: Ray's processes never inherit the write end
    cmd = [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), get_default_ray_temp_dir(),
           os.path.dirname(os.path.abspath(ray.__file__)), os.path.dirname(os.path.dirname(psutil.__file__))]
    try:
        # The child forks the watcher and exits at once, so the watcher is nobody's child (no
        # zombie here when it ends first) and, in its own session, gets no signal meant for ours.
        with subprocess.Popen(cmd, stdin=r, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              start_new_session=True) as proc:
            out, _ = proc.communicate(timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        os.close(w)
        logger.warning("could not start the embedded Ray's watcher (%s): its processes may outlive this one", e)
        return None
    finally:
        os.close(r)
    reaper = Reaper(w, int(out) if out.strip().isdigit() else None)
    _REAPERS.append(reaper)
    return reaper


# ---- the watcher (runs as `python -I reaper.py LAUNCHER_PID TEMP_ROOT RAY_DIR PSUTIL_DIR`) ----

def _wait(fd: int = 0) -> tuple[str | None, str]:
    """Read the launcher's lines until end of file, or until every head process has exited."""
    session, heads, buf = None, [], b""
    while True:
        ready, _, _ = select.select([fd, *heads], [], [])
        if fd in ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return session, "the launcher exited"
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                key, _, value = line.decode(errors="replace").partition(" ")
                if key == "session":
                    session = value
                elif key == "head" and hasattr(os, "pidfd_open"):  # Linux >= 5.3; elsewhere end of file only
                    try:
                        heads.append(os.pidfd_open(int(value)))
                    except (OSError, ValueError):
                        pass  # already gone
        for h in ready:
            if h != fd:  # a pidfd is readable once its process has exited
                heads.remove(h)
                os.close(h)
                if heads:
                    continue
                # A SIGKILLed launcher's children get PDEATHSIG when its thread that started them
                # ends, possibly before its last thread lets go of the pipe: wait a moment for that.
                if select.select([fd], [], [], 2.0)[0] and not os.read(fd, 4096):
                    return session, "the launcher exited"
                return session, "its head processes exited (ray.shutdown() or a crash)"


def _sessions_started_by(launcher: int, temp_root: str, since: float) -> list[str]:
    """Session directories `launcher` created after `since`: when it died inside `ray.init`."""
    try:
        names = os.listdir(temp_root)
    except OSError:
        return []
    found = []
    for name in names:
        m = _SESSION_NAME.match(name)
        if m and int(m.group(2)) == launcher:
            created = datetime.strptime(m.group(1), "%Y-%m-%d_%H-%M-%S_%f").timestamp()
            if created >= since - 1.0:
                found.append(os.path.join(temp_root, name))
    return found


def session_processes(psutil, session_dir: str, ray_dir: str, exclude: set[int] = frozenset()) -> list:
    """The live processes of the Ray session in `session_dir` (see the module docstring)."""
    session_dir = session_dir.rstrip("/")
    prefix = session_dir + "/"
    in_cmdline = re.compile(re.escape(session_dir) + r"(/|\s|$)")
    uid = os.getuid()
    matched = {}
    for p in psutil.process_iter(["pid", "uids", "name", "exe", "cmdline"]):
        info = p.info
        if info["pid"] in exclude or info["pid"] == os.getpid() or not info["uids"] or info["uids"].real != uid:
            continue
        try:
            paths = [f.path for f in p.open_files()]
        except psutil.Error:
            continue
        if "/logs/python-core-driver-" in " ".join(paths):
            continue  # a driver: the launcher, or a script that joined this Ray
        name, exe = info["name"] or "", info["exe"] or ""
        if not (name.startswith(("ray::", "ray-dashboard-")) or exe.startswith(ray_dir + os.sep)
                or os.path.basename(exe).startswith("python")):
            continue
        if any(x.startswith(prefix) for x in paths) or in_cmdline.search(" ".join(info["cmdline"] or [])):
            matched[p.pid] = p
    for p in list(matched.values()):
        try:
            for child in p.children(recursive=True):
                if child.pid not in exclude and child.pid != os.getpid() and child.uids().real == uid:
                    matched.setdefault(child.pid, child)
        except psutil.Error:
            pass
    return list(matched.values())


def end_session(psutil, session_dir: str, ray_dir: str, exclude: set[int], grace: float = GRACE_S) -> list[str]:
    """End the session's processes: a moment to exit by themselves (after `ray.shutdown()` they are
    on their way), then SIGTERM, then SIGKILL what is left after `grace`. One line per signal sent."""
    report = []
    procs = session_processes(psutil, session_dir, ray_dir, exclude)
    procs = _wait_gone(psutil, procs, 1.0)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0), (signal.SIGKILL, 2.0)):
        if sig == signal.SIGKILL:  # also what appeared meanwhile (a worker the dying raylet forked)
            procs = session_processes(psutil, session_dir, ray_dir, exclude)
        sent = []
        for p in procs:
            try:
                desc = f"{p.pid} {p.name()}"
                p.send_signal(sig)  # psutil checks that the pid was not reused
                report.append(f"{signal.Signals(sig).name} {desc}")
                sent.append(p)
            except psutil.Error:
                pass
        if not sent:
            break
        _wait_gone(psutil, sent, wait)
    return report


def _wait_gone(psutil, procs: list, timeout: float) -> list:
    """Wait up to `timeout` for `procs` to exit (a zombie has); return those still running."""
    deadline = time.monotonic() + timeout
    while True:
        procs = [p for p in procs if _running(psutil, p)]
        if not procs or time.monotonic() >= deadline:
            return procs
        time.sleep(0.05)


def _running(psutil, p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(argv: list[str]) -> None:
    launcher, temp_root, ray_dir, psutil_dir = int(argv[0]), argv[1], argv[2], argv[3]
    started = time.time()
    session, why = _wait(0)
    sys.path.append(psutil_dir)
    import psutil

    for session_dir in [session] if session else _sessions_started_by(launcher, temp_root, started):
        report = end_session(psutil, session_dir, ray_dir, exclude={launcher})
        try:
            with open(os.path.join(session_dir, "logs", LOG_NAME), "a", encoding="utf-8") as f:
                stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
                pids = {line.split()[1] for line in report}
                f.write(f"{stamp} {why} (launcher pid {launcher}): signalled {len(pids)} processes\n")
                f.writelines(f"  {line}\n" for line in report)
        except OSError:
            pass


if __name__ == "__main__":
    child = os.fork()
    if child:  # the short-lived middle process: report the watcher's pid and go
        sys.stdout.write(str(child))
        sys.stdout.flush()
        os._exit(0)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # let go of the launcher's stdout pipe (it waits for its end of file)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _watch(sys.argv[1:])
