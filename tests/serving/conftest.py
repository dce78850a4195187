"""Fixtures of the serving tests: headless Chromium for the chat page."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"  # Debian's; CI installs it (.ci/run)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    """Playwright's Chromium on /usr/bin/chromium; skipped without it (failed with $COATI_REQUIRE_CHROMIUM)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("COATI_REQUIRE_CHROMIUM"):
            pytest.fail(f"COATI_REQUIRE_CHROMIUM is set but {CHROMIUM} is missing")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()
