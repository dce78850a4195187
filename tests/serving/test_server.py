"""The chat server as a user runs it: `launchers/serve.py` in a subprocess, the real `openai` client,
raw HTTP for what a client library would refuse to send, and the chat page in headless Chromium."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(micro_model, tmp_path_factory):
    """The launcher on the micro model, with an API key, on 127.0.0.1 (its default host)."""
    from coati_ray.serve.process import ServerProcess

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(micro_model, "--api_key", KEY, "--served_model_name", "micro", log=log) as proc:
        yield {"base": proc.base, "log": log}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path: str, body, key: str | None = KEY, raw: bool = False) -> requests.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return requests.post(server["base"] + path, data=body if raw else json.dumps(body), headers=headers, timeout=120)


CHAT = {"model": "micro", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}


def test_listens_on_localhost_by_default_and_lists_its_model(server, client):
    assert "on http://127.0.0.1:" in server["log"].read_text()
    assert [m.id for m in client.models.list().data] == ["micro"]


def test_chat_completion_in_english_and_chinese(client):
    for text in ("What is 2 + 3?", "小明有3个苹果，又买了5个。一共有多少个？"):
        r = client.chat.completions.create(model="micro", messages=[{"role": "user", "content": text}], max_tokens=6,
                                           temperature=0.7, seed=1)
        choice = r.choices[0]
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert 1 <= r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > len(text) // 4


def test_a_streamed_answer_arrives_in_pieces_and_equals_the_whole_one(client):
    args = dict(model="micro", messages=CHAT["messages"], max_tokens=12, temperature=0)  # greedy: deterministic
    whole = client.chat.completions.create(**args).choices[0].message.content
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(**args, stream=True)
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == whole


def test_completions_honour_max_tokens_and_stop_strings(client):
    args = dict(model="micro", prompt="The answer is", temperature=0, max_tokens=16)
    full = client.completions.create(**args)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16
    stop = text[len(text) // 2:len(text) // 2 + 2]  # two characters from the middle of the greedy answer
    cut = client.completions.create(**args, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]


def test_32_concurrent_requests_are_all_answered_in_batches(server, client):
    before = requests.get(server["base"] + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()

    def ask(i):
        return client.chat.completions.create(model="micro", max_tokens=8, seed=i,
                                              messages=[{"role": "user", "content": f"{i} + {i} = ?"}])
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32 and all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    after = requests.get(server["base"] + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32 and after["max_batch"] > 1  # batched, not one by one


@pytest.mark.parametrize("body,status,param,code", [
    ('{"model": "micro", "messages": [', 400, None, None),  # malformed JSON
    ({"model": "micro"}, 400, "messages", "missing"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature", "float_parsing"),
    ({**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "literal_error"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens", "greater_than_equal"),
    ({**CHAT, "max_tokens": 100_000}, 400, "max_tokens", "context_length_exceeded"),
    ({**CHAT, "messages": [{"role": "user", "content": "plus " * 2000}]}, 400, "messages", "context_length_exceeded"),
    ({**CHAT, "model": "gpt-5"}, 404, "model", "model_not_found"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, status, param, code):
    r = post(server, "/v1/chat/completions", body, raw=isinstance(body, str))
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
    if code:
        assert err["code"] == code
    assert post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 2}).status_code == 200  # still serving


def test_requests_without_the_api_key_get_401(server):
    for key in (None, "wrong"):
        r = post(server, "/v1/chat/completions", CHAT, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server['base']}/v1", api_key="wrong", max_retries=0).models.list()
    assert requests.get(server["base"] + "/health").status_code == 200  # health needs no key


def test_the_chat_page_streams_an_answer_and_keeps_the_conversation(server, browser):
    page = browser.new_page()
    try:
        page.goto(server["base"] + "/")
        page.fill("#key", KEY)
        # the micro model is barely trained: bound each sampled answer so a loaded CI machine still
        # finishes both turns well inside the wait below
        page.fill("#max_tokens", "48")
        for n, text in enumerate(("Hello! What is 2 + 3?", "再算一次：4 + 4 = ?"), start=1):
            page.fill("#input", text)
            with page.expect_request("**/v1/chat/completions") as sent:
                page.click("#send")
            # the page sends the whole conversation: earlier turns, answers included
            assert [m["role"] for m in json.loads(sent.value.post_data)["messages"]] == \
                ["user", "assistant"] * (n - 1) + ["user"]
            answer = page.locator(".assistant").nth(n - 1)
            answer.and_(page.locator("[data-done='true']")).wait_for(timeout=60_000)
            assert int(answer.get_attribute("data-pieces")) >= 2  # it grew piece by piece: streamed
            assert answer.text_content().strip()
        assert page.locator(".user").all_text_contents() == ["Hello! What is 2 + 3?", "再算一次：4 + 4 = ?"]
    finally:
        page.close()
