"""A short soak of the chat server (`scripts/soak_serve.py`'s load, shortened): 8 clients for 25 s on
the micro model, mixing chat, streamed chat, completions and streams the client abandons mid-answer.

Bound on memory: the server's RSS may grow at most RSS_GROWTH_MB from after the 5 s warm-up to the
end. The micro model's weights are under 1 MB and its batches' tensors a few hundred KB, so what
grows is the Python heap and the allocator's caches: about 5-10 MB measured here (2026-11-30). 100 MB
is ten times that, room for allocator and thread-arena noise, and still what a leak of ~25 KB per
request (a kept prompt, KV cache row or response) over the ~4000 requests of this run would exceed.
"""

from __future__ import annotations

import math
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import soak_serve  # noqa: E402  (scripts/ is no package)

CLIENTS, SECONDS, WARMUP_S, DRAIN_S = 8, 25.0, 5.0, 30.0
RSS_GROWTH_MB = 100.0


@pytest.fixture(scope="module")
def soak(micro_model, tmp_path_factory):
    key = secrets.token_hex(16)
    log = tmp_path_factory.mktemp("soak") / "server.log"
    with soak_serve.start_server(micro_model, key, log) as server:
        result = soak_serve.Soak(server.base, server.proc.pid, "soak", key, clients=CLIENTS, seconds=SECONDS,
                                 max_requests=20_000, warmup_s=WARMUP_S, drain_s=DRAIN_S, seed=1).run()
    print("\n" + soak_serve.table(result))
    return result


def test_every_kind_ran_and_streams_were_abandoned(soak):
    assert all(k["n"] > 0 for k in soak["by_kind"].values()), soak["by_kind"]
    assert soak["abandoned"] > 0, "no stream was abandoned mid-answer"
    assert soak["requests"] <= 20_000 and soak["load_s"] < SECONDS + 60 and soak["client_threads_stuck"] == 0


def test_no_5xx_and_no_client_errors(soak):
    assert soak["status_5xx"] == 0, soak["error_examples"]
    assert not soak["errors_by_status"], f"{soak['errors_by_status']}: {soak['error_examples']}"
    assert not soak["stats_errors"], soak["stats_errors"]


def test_pending_work_drains_to_zero(soak):
    p = soak["pending"]
    assert p["drained"], f"still pending after {p['drain_wait_s']:.1f} s (limit {DRAIN_S} s): {p}"
    assert p["waiting_end"] == 0 and p["in_flight_end"] == 0 and p["generating_end"] == 0, p
    assert p["in_flight_max"] <= CLIENTS  # each client has one request open at a time
    assert soak["server"]["requests"] == soak["requests"], "the engine took a different number of requests"


def test_rss_growth_after_warmup_is_bounded(soak):
    rss = soak["rss_mb"]
    growth = rss["end"] - rss["after_warmup"]
    assert growth <= RSS_GROWTH_MB, f"RSS grew {growth:.0f} MB after the warm-up (bound {RSS_GROWTH_MB} MB): {rss}"


def test_latency_percentiles_are_reported_and_finite(soak):
    lat = soak["latency_s"]
    assert all(v is not None and math.isfinite(v) and v > 0 for v in lat.values()), lat
    assert lat["p50"] <= lat["p95"] <= lat["p99"]
    assert soak["ttfc_s"]["p95"] is not None and math.isfinite(soak["ttfc_s"]["p95"])
    assert not soak_serve.failures(soak, RSS_GROWTH_MB)
