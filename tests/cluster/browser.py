"""Headless Chromium helpers for looking at the Ray dashboard from tests (not a test file).

Checked against Debian's ``chromium`` 150 (``apt-get install -y chromium``) and the Ray 2.60 dashboard:
``--virtual-time-budget`` lets the single-page app fetch ``/api/v0/actors`` and render its table
before ``--dump-dom`` / ``--screenshot`` fire, even though the page keeps polling. A render of
``http://127.0.0.1:PORT/#/actors`` takes about 2 s of wall time here (2.5-3 s for a screenshot);
a budget of 500 virtual ms was already enough, 5000 is the margin used below.

Without a virtual-time budget the dump is taken before any script has run (an 818-byte shell).
Chromium exits 0 and prints an error page when the server is unreachable, so both helpers first
check that the URL answers over plain HTTP. The dashboard must run with token auth disabled
(``RAY_AUTH_MODE=disabled``); with auth on, the page shows an "Authentication Token Required" dialog
instead of data (the helpers check ``/api/authentication_mode`` first and raise). A browser would
authenticate through that dialog: it POSTs ``/api/authenticate`` with ``Authorization: Bearer <token>``
and gets an HttpOnly cookie ``ray-authentication-token``; the CLI has no flag to preset a cookie.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable

__all__ = ["ChromiumMissing", "chromium_path", "render_dom", "screenshot"]

# Binary names tried in order; CHROMIUM_PATH in the environment overrides them.
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# Flags that proved reliable as root in a container without a display, D-Bus or GPU.
_BASE_FLAGS = (
    "--headless",
    "--no-sandbox",  # needed as root
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)

DEFAULT_VIRTUAL_TIME_MS = 5000
DEFAULT_WINDOW = (1600, 1000)


class ChromiumMissing(RuntimeError):
    """No Chromium/Chrome executable was found."""


def chromium_path() -> str | None:
    """Path of a Chromium-compatible browser, or None when none is installed."""
    override = os.environ.get("CHROMIUM_PATH")
    if override:
        return override if os.access(override, os.X_OK) else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _require_chromium() -> str:
    path = chromium_path()
    if path is None:
        raise ChromiumMissing(
            "Chromium not found (looked for $CHROMIUM_PATH, then "
            + ", ".join(_CANDIDATES)
            + "). Install it with `apt-get install -y chromium` (Debian) or set CHROMIUM_PATH."
        )
    return path


def _check_reachable(url: str, timeout_s: float) -> None:
    """Raise if an http(s) URL does not answer (Chromium would exit 0 with an error page), or if
    it is a Ray dashboard with token auth on (the page would only show the login dialog)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return
    plain = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))
    wait = max(1.0, min(timeout_s, 10.0))
    try:
        urllib.request.urlopen(plain, timeout=wait).close()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{plain} answered HTTP {e.code}") from e
    except OSError as e:
        raise RuntimeError(f"{plain} is not reachable: {e}") from e
    # Ray dashboards answer this public endpoint; other servers give 404, which is fine.
    mode_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/api/authentication_mode", "", ""))
    try:
        with urllib.request.urlopen(mode_url, timeout=wait) as r:
            mode = json.loads(r.read()).get("authentication_mode")
    except (OSError, ValueError, AttributeError):
        return
    if mode == "token":
        raise RuntimeError(
            f"the Ray dashboard at {parts.netloc} has token auth on, so the page would only show the "
            "'Authentication Token Required' dialog; start Ray with RAY_AUTH_MODE=disabled"
        )


def _run(extra_flags: list[str], url: str, timeout_s: float) -> subprocess.CompletedProcess:
    exe = _require_chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, *_BASE_FLAGS, f"--user-data-dir={profile}", *extra_flags, url]
        # Own session so that a timeout can end Chromium's helper processes too.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise TimeoutError(f"chromium did not finish within {timeout_s:.1f} s: {url}") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"chromium exited {proc.returncode} for {url}; stderr tail:\n{_tail(err)}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tail(text: str, lines: int = 15) -> str:
    keep = [l for l in (text or "").splitlines() if "dbus" not in l]  # D-Bus noise is harmless
    return "\n".join(keep[-lines:])


def render_dom(
    url: str,
    timeout_s: float = 60.0,
    *,
    expect: Iterable[str] | None = None,
    virtual_time_ms: int = DEFAULT_VIRTUAL_TIME_MS,
) -> str:
    """Serialized DOM of ``url`` after the page's scripts ran for ``virtual_time_ms``.

    With ``expect``, renders again until every string occurs in the DOM or ``timeout_s`` is spent,
    and returns the last DOM either way (the caller asserts). ``timeout_s`` bounds the wall time.
    """
    deadline = time.monotonic() + timeout_s
    wanted = list(expect or ())
    _check_reachable(url, timeout_s)
    while True:
        left = deadline - time.monotonic()
        dom = _run(
            [f"--virtual-time-budget={int(virtual_time_ms)}", "--dump-dom"], url, max(left, 1.0)
        ).stdout
        if all(s in dom for s in wanted) or deadline - time.monotonic() < 3.0:
            return dom
        time.sleep(1.0)


def screenshot(
    url: str,
    png_path: str,
    timeout_s: float = 60.0,
    *,
    window_size: tuple[int, int] = DEFAULT_WINDOW,
    virtual_time_ms: int = DEFAULT_VIRTUAL_TIME_MS,
) -> None:
    """Write a PNG of ``url`` (``window_size`` pixels) to ``png_path``."""
    _check_reachable(url, timeout_s)
    png_path = os.path.abspath(png_path)
    os.makedirs(os.path.dirname(png_path), exist_ok=True)
    if os.path.exists(png_path):
        os.remove(png_path)
    w, h = window_size
    res = _run(
        [
            f"--virtual-time-budget={int(virtual_time_ms)}",
            f"--window-size={w},{h}",
            f"--screenshot={png_path}",
        ],
        url,
        timeout_s,
    )
    if not os.path.isfile(png_path) or os.path.getsize(png_path) == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {png_path}; stderr tail:\n{_tail(res.stderr)}")
