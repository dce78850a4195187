"""The OpenAI-compatible HTTP API (FastAPI) and the chat page, over a `BatchingEngine`.

    GET  /health                 {"status": "ok"} (no key needed)
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> the model's chat template; "stream": true for SSE
    POST /v1/completions         a raw prompt
    GET  /                       the chat page

Bad requests get a 4xx with OpenAI's error body, {"error": {"message", "type", "param", "code"}},
and the server keeps serving. With an API key set, /v1/* needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
import uuid
from importlib import resources
from typing import Literal

from pydantic import BaseModel, Field

from coati_ray.serve.engine import BatchingEngine, Event, GenRequest

DEFAULT_MAX_TOKENS = 256


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [x for x in s if x]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def create_app(engine: BatchingEngine, model_name: str, context_len: int, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="coati_ray chat server", docs_url=None, redoc_url=None)
    tok = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"malformed JSON body: {err.get('msg')}").body(), status_code=400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return JSONResponse(APIError(400, "the request body must be a JSON object (Content-Type: "
                                         "application/json)").body(), status_code=400)
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return JSONResponse(APIError(400, msg, param, err.get("type")).body(), status_code=400)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                return JSONResponse(APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'", "model",
                           "model_not_found")

    def make_request(body: _Sampling, prompt_ids: list[int], param: str, emit) -> GenRequest:
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

    async def events(req: GenRequest, q: asyncio.Queue):
        try:
            while True:
                ev: Event = await q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            req.cancelled.set()  # a client that went away frees its row

    async def collect(req: GenRequest, q: asyncio.Queue) -> tuple[str, Event]:
        parts, last = [], None
        async for ev in events(req, q):
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
        return dict(engine.stats)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        text = tok.apply_chat_template([m.model_dump() for m in body.messages], tokenize=False,
                                       add_generation_prompt=True)
        req, q = start(body, tok(text, add_special_tokens=False)["input_ids"], "messages")
        rid, ts = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": ts, "model": model_name}
        if body.stream:
            async def chunks():
                yield {**head, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                async for ev in events(req, q):
                    done = ev.finish_reason
                    yield {**head, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": ev.text} if ev.text else {},
                                        "finish_reason": done}], **({"usage": usage(ev)} if done else {})}
            return sse(chunks())
        answer, last = await collect(req, q)
        return {**head, "object": "chat.completion", "usage": usage(last),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": last.finish_reason}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        req, q = start(body, tok(body.prompt)["input_ids"], "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name,
                "object": "text_completion"}
        if body.stream:
            async def chunks():
                async for ev in events(req, q):
                    yield {**head, "choices": [{"index": 0, "text": ev.text, "finish_reason": ev.finish_reason}]}
            return sse(chunks())
        answer, last = await collect(req, q)
        return {**head, "usage": usage(last),
                "choices": [{"index": 0, "text": answer, "finish_reason": last.finish_reason}]}

    page = resources.files("coati_ray.serve").joinpath("chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page.replace("__MODEL__", html.escape(model_name, quote=True))

    return app
