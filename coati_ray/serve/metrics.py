"""Prometheus metrics of the chat server, served at GET /metrics (text exposition format).

    coati_requests_total{endpoint,status}          every /v1 request, by route and HTTP status
    coati_requests_in_progress{endpoint}           /v1 requests being answered now (a stream until its end)
    coati_request_latency_seconds{endpoint}        histogram: arrival to the last byte, 2xx answers only
    coati_time_to_first_token_seconds{endpoint}    histogram: the route's start to the first text
    coati_prompt_tokens_total, coati_generation_tokens_total   tokens of finished generations
    coati_request_prompt_tokens, coati_request_generation_tokens   histograms of the same, per request
    coati_finished_requests_total{finish_reason}   "stop" | "length" | "error"
    coati_queue_depth, coati_running_rows          the engine's waiting requests and decoding rows, at scrape time
    coati_engine_steps_total, coati_engine_rows_total   decoding steps, and rows summed over them
    coati_batch_size                               rows per decoding step since start (rows_total / steps)

Each app has its own `CollectorRegistry` (tests run several apps in one process; the global
registry would refuse the second set of names). The engine's figures come from its `stats()`
(the hf `BatchingEngine`: queue_depth, running, steps, rows_total); an engine with a `stats` dict
instead (vLLM's) exports whichever of those keys it has. `endpoint` is a route of this server
or "other" (an unknown /v1 path): a client cannot grow the label set.
"""

from __future__ import annotations

import time

from coati_ray.errors import MissingExtraError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = tuple(2 ** k for k in range(15))  # 1 .. 16384


def engine_stats(engine) -> dict:
    """The engine's counters as a dict: `stats()` if it is a method, else its `stats` dict, else {}."""
    s = getattr(engine, "stats", None)
    s = s() if callable(s) else s
    return dict(s) if isinstance(s, dict) else {}


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise MissingExtraError("prometheus_client", "serve", "the chat server's /metrics") from None
    return prometheus_client


class _EngineCollector:
    """The engine's gauges and counters, read when Prometheus scrapes (no thread polls the engine)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = engine_stats(self.engine)
        if "queue_depth" in s:
            yield GaugeMetricFamily("coati_queue_depth", "Requests waiting for a row in the engine.", s["queue_depth"])
        if "running" in s:
            yield GaugeMetricFamily("coati_running_rows", "Requests the engine is generating now.", s["running"])
        if "steps" in s and "rows_total" in s:
            yield CounterMetricFamily("coati_engine_steps", "Decoding steps the engine ran.", s["steps"])
            yield CounterMetricFamily("coati_engine_rows", "Rows decoded, summed over the engine's steps.",
                                      s["rows_total"])
            yield GaugeMetricFamily("coati_batch_size", "Mean rows per decoding step since the server started "
                                    "(rate(coati_engine_rows_total) / rate(coati_engine_steps_total): over a window).",
                                    s["rows_total"] / s["steps"] if s["steps"] else 0.0)


class ServerMetrics:
    """The server's metrics on a registry of its own; `render()` is the /metrics body."""

    def __init__(self, engine):
        prom = _prometheus()
        self._prom = prom
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("coati_requests", "HTTP requests to /v1 routes, by route and status.",
                                     ["endpoint", "status"], registry=r)
        self.in_progress = prom.Gauge("coati_requests_in_progress", "/v1 requests being answered now.",
                                      ["endpoint"], registry=r)
        self.latency = prom.Histogram("coati_request_latency_seconds", "Seconds from a request's arrival to the "
                                      "last byte of its answer (2xx answers).", ["endpoint"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = prom.Histogram("coati_time_to_first_token_seconds", "Seconds from a generation request's start "
                                   "to its first text.", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = prom.Counter("coati_prompt_tokens", "Prompt tokens of finished generations.",
                                          registry=r)
        self.generation_tokens = prom.Counter("coati_generation_tokens", "Tokens generated (finished requests).",
                                              registry=r)
        self.prompt_hist = prom.Histogram("coati_request_prompt_tokens", "Prompt tokens per finished request.",
                                          buckets=_TOKEN_BUCKETS, registry=r)
        self.generation_hist = prom.Histogram("coati_request_generation_tokens", "Generated tokens per finished "
                                              "request.", buckets=_TOKEN_BUCKETS, registry=r)
        self.finished = prom.Counter("coati_finished_requests", "Generations that ended, by why.", ["finish_reason"],
                                     registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST

    def timer(self, endpoint: str) -> GenerationTimer:
        return GenerationTimer(self, endpoint)


class GenerationTimer:
    """One generation request: `saw(event)` for each engine event records the time to the first
    text and, at the end, the tokens and the finish reason."""

    def __init__(self, metrics: ServerMetrics, endpoint: str):
        self.m, self.endpoint, self.t0, self.first = metrics, endpoint, time.perf_counter(), True

    def saw(self, ev) -> None:
        if self.first and (ev.text or ev.finish_reason in ("stop", "length")):
            self.first = False
            self.m.ttft.labels(self.endpoint).observe(time.perf_counter() - self.t0)
        if ev.finish_reason is None:
            return
        self.m.finished.labels(ev.finish_reason).inc()
        if ev.finish_reason != "error":
            self.m.prompt_tokens.inc(ev.prompt_tokens)
            self.m.generation_tokens.inc(ev.completion_tokens)
            self.m.prompt_hist.observe(ev.prompt_tokens)
            self.m.generation_hist.observe(ev.completion_tokens)


class MetricsMiddleware:
    """ASGI middleware counting every /v1 request by route and status, with its latency (a stream's
    latency runs to its last chunk). Outside the key and body guard: a 401 or 413 is counted too."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.m = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        endpoint = path if path in ENDPOINTS else "other"
        t0, status = time.perf_counter(), 500  # 500: an exception before any answer (the app's handler sends it)

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.m.in_progress.labels(endpoint).inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.m.in_progress.labels(endpoint).dec()
            self.m.requests.labels(endpoint, str(status)).inc()
            if 200 <= status < 300:
                self.m.latency.labels(endpoint).observe(time.perf_counter() - t0)
