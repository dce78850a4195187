"""Run `launchers/serve.py` as a child process and wait until it answers (tests, benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

LAUNCHER = Path(__file__).resolve().parents[2] / "launchers" / "serve.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`ServerProcess(model, "--api_key", "k")`: the launcher on a free port of 127.0.0.1, its
    output in `log`; `base` is its URL. A context manager; `stop()` ends it."""

    def __init__(self, model: str, *flags: str, log: Path | None = None, python: str = sys.executable,
                 timeout_s: float = 300.0):
        import requests

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(os.devnull)
        with open(self.log, "w") as out:
            # its own process group: stop() ends the engine's child processes too (vLLM's engine core)
            self.proc = subprocess.Popen([python, str(LAUNCHER), model, "--port", str(self.port), *flags], stdout=out,
                                         stderr=subprocess.STDOUT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text()[-3000:] if self.log != Path(os.devnull) else ""
                raise RuntimeError(f"the server did not come up (exit {self.proc.returncode}):\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                continue
            try:  # the launcher is gone; its children get the same signal before we leave
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
