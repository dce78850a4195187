"""The OpenAI-compatible HTTP API (FastAPI) and the chat page, over a `BatchingEngine`.

    GET  /health                 {"status": "ok"} (no key needed)
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> the model's chat template; "stream": true for SSE
    POST /v1/completions         a raw prompt
    POST /v1/feedback            a judgment of an answer, stored (`feedback`: a serve.feedback.FeedbackStore)
    GET  /                       the chat page
    GET  /stats, /openapi.json   the engine's counters; the API's schema
    GET  /metrics                Prometheus metrics (serve.metrics; no key needed, like /health)

Every error, 4xx or 5xx, has OpenAI's body, {"error": {"message", "type", "param", "code"}}, and
the server keeps serving. A parameter the server does not honour is refused, never dropped
(serve.params). With an API key set, everything but /health, /metrics and the chat page needs
`Authorization: Bearer <key>` (/docs and /redoc are off).

Before a request reaches a route (`_Guard`): its `Host` header must name this server (a DNS-
rebinding page gets 400), then the key, then its body is read only up to `max_body_bytes` (413
beyond; a larger Content-Length is refused before any of it is read). Prompts are tokenized off
the event loop, and one with more characters than the context could hold even at the tokenizer's
longest token is refused without tokenizing it.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import ipaddress
import json
import socket
import time
import uuid
from importlib import resources

from coati_ray.serve.engine import BatchingEngine, Event, GenRequest
from coati_ray.serve.metrics import ENDPOINTS, GenerationTimer, MetricsMiddleware, ServerMetrics, engine_stats
from coati_ray.serve.params import ChatRequest, CompletionRequest, Message, Text, _Sampling

__all__ = ["APIError", "HostCheck", "Message", "Text", "create_app"]  # Message, Text: for serve.feedback

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# A token covers at most as many characters as its vocabulary string has (byte-level BPE: one
# character per byte; SentencePiece: "▁" for a space, <0xNN> for a byte). The factor leaves room for
# a normalizer that composes characters (NFC: "e" + U+0301 -> "é").
_CHARS_PER_TOKEN_SLACK = 2


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None):
        """The error as a JSON response (ASCII-escaped: a message quoting bad input always encodes)."""
        from starlette.responses import Response

        return Response(json.dumps(self.body(), ensure_ascii=True), self.status, headers,
                        media_type="application/json")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """("name", port or None) of a Host header, the name lowercased ("[::1]" keeps its brackets); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value.partition("]")
        name += "]"
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, colon, port = value.partition(":")
        port = port if colon else None
    if not name or name == "[]" or (port is not None and not port.isdigit()):
        return None
    return name, int(port) if port is not None else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


class HostCheck:
    """Which `Host` headers name this server: the loopback names, the listening address, `extra`
    ("*": any). Listening on a wildcard address (0.0.0.0, ::) adds any IP literal and this machine's
    hostname: DNS rebinding needs a domain name, so an IP literal is no rebinding."""

    def __init__(self, host: str = "127.0.0.1", extra: tuple[str, ...] | list[str] = ()):
        host = host.strip().lower()
        self.any = "*" in extra
        self.names = set(LOCAL_HOSTS) | {f"[{host}]" if ":" in host and not host.startswith("[") else host}
        self.names |= {e.strip().lower() for e in extra if e.strip() and e.strip() != "*"}
        self.wildcard = host in ("", "0.0.0.0", "::", "[::]")
        if self.wildcard:
            self.names.add(socket.gethostname().lower())

    def ok(self, value: str | None, port: int | None) -> bool:
        if self.any:
            return True
        parsed = _split_host(value) if value else None
        if parsed is None:
            return False
        name, given_port = parsed
        if given_port is not None and port is not None and given_port != port:
            return False
        return name in self.names or (self.wildcard and _is_ip(name))


class _Guard:
    """ASGI middleware in front of every route: the Host header, then the API key (all but `open_paths`),
    then the body, read here up to `max_body_bytes` and handed on whole. A Content-Length over the
    limit is refused before a byte of the body is read; a chunked body is counted as it arrives."""

    def __init__(self, app, hosts: HostCheck, api_key: str | None, max_body_bytes: int,
                 open_paths: tuple[str, ...] = ("/health", "/metrics", "/")):
        self.app, self.hosts, self.api_key, self.max_body = app, hosts, api_key, max_body_bytes
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        port = (scope.get("server") or (None, None))[1]
        if not self.hosts.ok(headers.get("host"), port):
            err = APIError(400, f"the Host header {headers.get('host')!r} does not name this server (start it "
                           "with --allowed_hosts to accept that name)", code="invalid_host")
            return await err.response({"connection": "close"})(scope, receive, send)
        if self.api_key and scope["path"] not in self.open_paths:
            given = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode("latin-1", "replace")):
                return await APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key").response()(scope, receive, send)
        too_big = APIError(413, f"the request body is larger than this server's limit of {self.max_body} bytes",
                           code="request_too_large")
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await APIError(400, f"invalid Content-Length {length!r}").response(
                    {"connection": "close"})(scope, receive, send)
            if int(length) > self.max_body:
                return await too_big.response({"connection": "close"})(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await too_big.response({"connection": "close"})(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the real channel: a client that goes away mid-answer is seen

        return await self.app(scope, replay, send)


def create_app(engine: BatchingEngine, model_name: str, context_len: int, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, host: str = "127.0.0.1",
               allowed_hosts: tuple[str, ...] | list[str] = (), feedback=None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="coati_ray chat server", docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, hosts=HostCheck(host, allowed_hosts), api_key=api_key, max_body_bytes=max_body_bytes)
    metrics = ServerMetrics(engine)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, so 401s and 413s count too
    tok = engine.tokenizer
    created = int(time.time())
    longest_token = max((len(t) for t in tok.get_vocab()), default=1) if hasattr(tok, "get_vocab") else 64
    max_prompt_chars = context_len * max(longest_token, 1) * _CHARS_PER_TOKEN_SLACK

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return APIError(400, f"malformed JSON body: {err.get('msg')}").response()
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return APIError(400, "the request body must be a JSON object (Content-Type: application/json)").response()
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":  # a field OpenAI's API does not define (see serve.params)
            return APIError(400, f"Unrecognized request argument supplied: {param} (this server does not support "
                            "it)", param, "unknown_parameter").response()
        msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return APIError(400, msg, param, err.get("type")).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            msg, code = f"Invalid URL ({request.method} {request.url.path})", "not_found"
        elif e.status_code == 405:
            msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(e.detail), None
        kind = "server_error" if e.status_code >= 500 else "invalid_request_error"
        return APIError(e.status_code, msg, code=code, kind=kind).response(e.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):  # logged by uvicorn; the client gets no traceback
        return APIError(500, "the server had an internal error while processing the request",
                        kind="server_error").response()

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'", "model",
                           "model_not_found")

    def too_long(chars: int, param: str) -> APIError:
        return APIError(400, f"the prompt has {chars} characters, more than this model's context of {context_len} "
                        "tokens can hold", param, "context_length_exceeded")

    async def encode(text: str, param: str, special: bool) -> list[int]:
        """The prompt's token ids, counted off the event loop (a long prompt does not stall other clients)."""
        if len(text) > max_prompt_chars:
            raise too_long(len(text), param)
        return await asyncio.to_thread(lambda: tok(text, add_special_tokens=special)["input_ids"])

    async def encode_chat(messages: list[Message]) -> list[int]:
        chars = sum(len(m.content) for m in messages)
        if chars > max_prompt_chars:  # before the template or the tokenizer see it
            raise too_long(chars, "messages")

        def template() -> str:
            from jinja2 import TemplateError

            try:
                return tok.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                               add_generation_prompt=True)
            except TemplateError as e:  # e.g. a template that refuses a system message
                raise APIError(400, f"messages: the model's chat template refused them: {e}", "messages") from None
        return await encode(await asyncio.to_thread(template), "messages", special=False)

    def make_request(body: _Sampling, prompt_ids: list[int], param: str, emit) -> GenRequest:
        if not prompt_ids:
            raise APIError(400, f"{param}: the prompt is empty (it has no tokens)", param, "empty_prompt")
        room = context_len - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {context_len} "
                           "tokens", param, "context_length_exceeded")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + the prompt's {len(prompt_ids)} tokens exceed this "
                           f"model's context of {context_len} tokens", "max_tokens", "context_length_exceeded")
        return GenRequest(prompt_ids, max_tokens, emit, body.temperature, body.top_p, body.stops(), body.seed)

    def start(body: _Sampling, prompt_ids: list[int], param: str) -> tuple[GenRequest, asyncio.Queue]:
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        req = make_request(body, prompt_ids, param, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        engine.submit(req)
        return req, q

    async def events(req: GenRequest, q: asyncio.Queue, timer: GenerationTimer):
        try:
            while True:
                ev: Event = await q.get()
                timer.saw(ev)
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            req.cancelled.set()  # a client that went away frees its row

    async def collect(req: GenRequest, q: asyncio.Queue, timer: GenerationTimer) -> tuple[str, Event]:
        parts, last = [], None
        async for ev in events(req, q, timer):
            if ev.finish_reason == "error":
                raise APIError(500, f"generation failed: {ev.text}", kind="server_error")
            parts.append(ev.text)
            last = ev
        return "".join(parts), last

    def usage(ev: Event) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    def sse(chunks) -> StreamingResponse:
        async def body():
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "coati_ray", "max_model_len": context_len}]}

    @app.get("/stats")
    async def stats():
        return engine_stats(engine)

    @app.get("/metrics")
    async def prometheus_metrics():
        from starlette.responses import Response

        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        timer = metrics.timer(ENDPOINTS[0])
        check_model(body.model)
        req, q = start(body, await encode_chat(body.messages), "messages")
        rid, ts = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": ts, "model": model_name}
        if body.stream:
            async def chunks():
                yield {**head, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                async for ev in events(req, q, timer):
                    done = ev.finish_reason
                    yield {**head, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": ev.text} if ev.text else {},
                                        "finish_reason": done}], **({"usage": usage(ev)} if done else {})}
                    if done and body.stream_options and body.stream_options.include_usage:
                        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(ev)}
            return sse(chunks())
        answer, last = await collect(req, q, timer)
        return {**head, "object": "chat.completion", "usage": usage(last),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": last.finish_reason}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        timer = metrics.timer(ENDPOINTS[1])
        check_model(body.model)
        req, q = start(body, await encode(body.prompt, "prompt", special=True), "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name,
                "object": "text_completion"}
        if body.stream:
            async def chunks():
                async for ev in events(req, q, timer):
                    yield {**head, "choices": [{"index": 0, "text": ev.text, "finish_reason": ev.finish_reason}]}
                    if ev.finish_reason and body.stream_options and body.stream_options.include_usage:
                        yield {**head, "choices": [], "usage": usage(ev)}
            return sse(chunks())
        answer, last = await collect(req, q, timer)
        return {**head, "usage": usage(last),
                "choices": [{"index": 0, "text": answer, "finish_reason": last.finish_reason}]}

    if feedback is not None:  # else POST /v1/feedback is a 404 like any unknown path
        feedback.add_route(app, model_name)
    page = resources.files("coati_ray.serve").joinpath("chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page.replace("__MODEL__", html.escape(model_name, quote=True))

    return app
