"""The chat server's limits and guards, through the real server (`launchers/serve.py` in a subprocess,
raw HTTP on 127.0.0.1): the body-size limit, long prompts refused early, 4xx (not 500) for bad
values, OpenAI's error body on every error, the API key on everything but /health and the chat page,
and the Host check against DNS rebinding."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests

KEY = "limits-key-456"
LIMIT = 2_000_000  # --max_body_bytes: above the 1 MB prompt below
CHAT = {"model": "micro", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 2}
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(micro_model, tmp_path_factory):
    from coati_ray.serve.process import ServerProcess

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(micro_model, "--api_key", KEY, "--served_model_name", "micro", "--max_body_bytes", str(LIMIT),
                       "--allowed_hosts", "chat.example, other.example", log=log) as proc:
        yield {"base": proc.base, "port": proc.port, "log": log}


def post(server, path: str, body, headers: dict | None = None, timeout: float = 60) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(server["base"] + path, data=data, timeout=timeout,
                         headers={"Content-Type": "application/json", **AUTH, **(headers or {})})


def openai_error(r: requests.Response, status: int, kind: str = "invalid_request_error") -> dict:
    """The response is `status` with exactly OpenAI's error body; its error object."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]


def still_serving(server) -> None:
    r = post(server, "/v1/chat/completions", CHAT, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def raw_exchange(server, head: bytes, body_chunks=(), timeout: float = 15.0) -> tuple[int, dict, bytes]:
    """Send a request's head and then body chunks on one socket (stopping early if the server
    already answered or closed), and read the response: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=timeout) as s:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data or len(data) < _expected_len(data):
            assert time.monotonic() < deadline, f"no complete answer in {timeout} s: {data[:200]!r}"
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _expected_len(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    for line in head.decode("latin-1").lower().split("\r\n"):
        if line.startswith("content-length:"):
            return len(head) + len(sep) + int(line.split(":")[1])
    return 0


def request_head(server, length: int | None = None, chunked: bool = False) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{server['port']}",
             "Content-Type: application/json", f"Authorization: Bearer {KEY}"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def check_413(status: int, headers: dict, body: bytes) -> None:
    assert status == 413 and headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "request_too_large"
    assert err["type"] == "invalid_request_error" and str(LIMIT) in err["message"]


# ---------------------------------------------------------------- 1. the body-size limit

def test_a_50mb_content_length_is_refused_with_413_before_the_body_is_sent(server):
    t0 = time.monotonic()
    # only the head: the server answers from Content-Length alone, without waiting for (or reading) the body
    status, headers, body = raw_exchange(server, request_head(server, length=50_000_000), timeout=15)
    assert time.monotonic() - t0 < 10
    check_413(status, headers, body)
    assert headers.get("connection") == "close"
    still_serving(server)


def test_a_chunked_body_over_the_limit_is_counted_and_refused_with_413(server):
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    n = LIMIT // len(piece) + 4  # a little over the limit, no Content-Length to trust
    t0 = time.monotonic()
    status, headers, body = raw_exchange(server, request_head(server, chunked=True), [chunk] * n + [b"0\r\n\r\n"])
    assert time.monotonic() - t0 < 10
    check_413(status, headers, body)
    still_serving(server)


def test_a_body_under_the_limit_is_read_whole_chunked_or_not(server):
    body = json.dumps(CHAT).encode()
    chunks = [f"{len(body[i:i + 7]):x}\r\n".encode() + body[i:i + 7] + b"\r\n" for i in range(0, len(body), 7)]
    status, _, answer = raw_exchange(server, request_head(server, chunked=True), chunks + [b"0\r\n\r\n"], timeout=60)
    assert status == 200 and json.loads(answer)["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_openai_client_sending_10mb_gets_a_413_quickly(server):
    client = openai.OpenAI(base_url=f"{server['base']}/v1", api_key=KEY, max_retries=0, timeout=30)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "word " * 2_000_000}],
                                       max_tokens=2)
    assert time.monotonic() - t0 < 10
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    still_serving(server)


# ---------------------------------------------------------------- 2. long prompts

@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "many words " * 100_000}]},
     "messages"),
    ("/v1/completions", {"model": "micro", "prompt": "many words " * 100_000, "max_tokens": 2}, "prompt"),
])
def test_a_1mb_prompt_gets_context_length_exceeded_quickly(server, path, body, param):
    t0 = time.monotonic()
    r = post(server, path, body, timeout=30)
    assert time.monotonic() - t0 < 10
    err = openai_error(r, 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == param
    still_serving(server)


def test_prompts_are_counted_off_the_event_loop_and_others_are_served_meanwhile(server):
    """A prompt just under the early refusal is tokenized in a thread: its answer is still a 400."""
    r = post(server, "/v1/completions", {"model": "micro", "prompt": "ab " * 10_000, "max_tokens": 2})
    assert openai_error(r, 400)["code"] == "context_length_exceeded"
    assert requests.get(server["base"] + "/health", timeout=10).status_code == 200


# ---------------------------------------------------------------- 3. 4xx, not 500, and OpenAI's body on every error

@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {**CHAT, "seed": 2 ** 64}, "seed"),
    ("/v1/chat/completions", {**CHAT, "seed": 10 ** 30}, "seed"),
    ("/v1/chat/completions", {**CHAT, "seed": -(2 ** 63) - 1}, "seed"),
    ("/v1/chat/completions", '{"model": "micro", "max_tokens": 2, "messages": [{"role": "user", '
                             '"content": "a \\ud800 b"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"model": "micro", "max_tokens": 2, "stop": ["\\udfff"], "messages": '
                             '[{"role": "user", "content": "hi"}]}', "stop"),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/completions", '{"model": "micro", "prompt": "x\\udc80", "max_tokens": 2}', "prompt"),
    ("/v1/completions", {"model": "micro", "prompt": "", "max_tokens": 2}, "prompt"),
])
def test_bad_values_get_a_400_naming_the_field(server, path, body, param):
    err = openai_error(post(server, path, body), 400)
    assert err["param"] == param or (err["param"] or "").startswith(param + "."), err
    still_serving(server)


def test_a_seed_at_the_64_bit_edges_is_accepted(server):
    for seed in (2 ** 64 - 1, -(2 ** 63), 0):
        assert post(server, "/v1/chat/completions", {**CHAT, "seed": seed}).status_code == 200


def test_a_tiny_temperature_is_greedy_not_a_failed_batch(server):
    r = post(server, "/v1/completions", {"model": "micro", "prompt": "The answer is", "max_tokens": 4,
                                         "temperature": 1e-300})
    greedy = post(server, "/v1/completions", {"model": "micro", "prompt": "The answer is", "max_tokens": 4,
                                              "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_unknown_routes_and_methods_get_openai_errors(server):
    err = openai_error(requests.get(server["base"] + "/v1/nothing", headers=AUTH, timeout=10), 404)
    assert err["code"] == "not_found" and "/v1/nothing" in err["message"]
    r = requests.get(server["base"] + "/v1/chat/completions", headers=AUTH, timeout=10)
    assert openai_error(r, 405)["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    openai_error(post(server, "/v1/chat/completions", "[1, 2]"), 400)
    assert openai_error(post(server, "/v1/chat/completions", CHAT, {"Authorization": "Bearer no"}),
                        401)["code"] == "invalid_api_key"


def test_an_unexpected_exception_is_a_500_in_openai_shape_without_a_traceback(micro_model):
    """The catch-all handler of the real app, with the real engine, on a route that fails."""
    from starlette.testclient import TestClient

    from coati_ray.models.loading import load_causal_lm, load_tokenizer
    from coati_ray.serve.api import create_app
    from coati_ray.serve.engine import BatchingEngine

    app = create_app(BatchingEngine(load_causal_lm(micro_model), load_tokenizer(micro_model)), "micro", 512)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as client:
        r = client.get("/boom")
        assert r.status_code == 500
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
        assert "secret" not in r.text and "Traceback" not in r.text
        assert client.get("/health").status_code == 200


# ---------------------------------------------------------------- 4. the API key

def test_with_a_key_only_health_and_the_chat_page_are_open(server):
    base = server["base"]
    for path in ("/stats", "/openapi.json", "/docs", "/redoc", "/v1/models", "/nothing"):
        r = requests.get(base + path, timeout=10)
        assert openai_error(r, 401)["code"] == "invalid_api_key", path
        assert openai_error(requests.get(base + path, headers={"Authorization": "Bearer wrong"}, timeout=10),
                            401)["code"] == "invalid_api_key"
    assert requests.get(base + "/stats", headers=AUTH, timeout=10).json()["requests"] >= 0
    assert requests.get(base + "/openapi.json", headers=AUTH, timeout=10).json()["info"]["title"]
    for path in ("/docs", "/redoc"):  # off: the schema is /openapi.json, with the key
        assert openai_error(requests.get(base + path, headers=AUTH, timeout=10), 404)["code"] == "not_found"
    assert requests.get(base + "/health", timeout=10).json() == {"status": "ok"}
    assert "<html" in requests.get(base + "/", timeout=10).text.lower()


# ---------------------------------------------------------------- 5. the Host header

@pytest.mark.parametrize("host,ok", [
    ("evil.example", False),
    ("evil.example:{port}", False),
    ("127.0.0.1.evil.example:{port}", False),
    ("127.0.0.1:1", False),  # our name, another port
    ("", False),
    ("127.0.0.1:{port}", True),
    ("localhost:{port}", True),
    ("LOCALHOST", True),
    ("[::1]:{port}", True),
    ("chat.example:{port}", True),  # --allowed_hosts
    ("other.example", True),
])
def test_only_hosts_this_server_serves_are_accepted(server, host, ok):
    headers = {**AUTH, "Host": host.format(port=server["port"])}
    r = requests.get(server["base"] + "/v1/models", headers=headers, timeout=10)
    if ok:
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "micro"
    else:
        assert openai_error(r, 400)["code"] == "invalid_host"
        assert requests.get(server["base"] + "/", headers={"Host": host.format(port=server["port"])},
                            timeout=10).status_code == 400  # the chat page too: a rebinding page cannot read it
    assert requests.get(server["base"] + "/health", timeout=10).status_code == 200


def test_host_rules():
    from coati_ray.serve.api import HostCheck

    local = HostCheck("127.0.0.1")
    assert local.ok("127.0.0.1:8000", 8000) and local.ok("localhost", 8000) and local.ok("[::1]:8000", 8000)
    assert not local.ok("10.1.2.3:8000", 8000) and not local.ok("[::1]:9", 8000) and not local.ok(None, 8000)
    assert not local.ok("::1", 8000) and not local.ok("localhost:80x", 8000) and not local.ok("[::1", 8000)
    assert HostCheck("::1").ok("[::1]:8000", 8000)
    wide = HostCheck("0.0.0.0", ["gpu-box"])
    assert wide.ok("10.1.2.3:8000", 8000) and wide.ok("[fe80::1]:8000", 8000) and wide.ok("gpu-box:8000", 8000)
    assert not wide.ok("evil.example:8000", 8000)
    assert HostCheck("127.0.0.1", ["*"]).ok("anything.example", 8000)


def test_a_request_the_http_parser_refuses_gets_openais_error_body(server):
    """uvicorn's parser answers a malformed request itself, before the app: still OpenAI's shape."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server['port']}\r\nContent-Type: "
            "application/json\r\nContent-Length: abc\r\n\r\n").encode()
    status, headers, body = raw_exchange(server, head)
    assert status == 400 and headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"].startswith("malformed HTTP request")
    still_serving(server)
