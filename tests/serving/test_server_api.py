"""The server's API surface through the real launcher (`launchers/serve.py` in a subprocess on the micro
model): Prometheus `/metrics` checked against the usage the answers reported, and OpenAI's parameters
either honoured or refused with a 400 naming them (never silently dropped)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

KEY = "api-key-789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "micro", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 2}
COMPLETION = {"model": "micro", "prompt": "The answer is", "max_tokens": 2}


@pytest.fixture(scope="module")
def server(micro_model, tmp_path_factory):
    from coati_ray.serve.process import ServerProcess

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(micro_model, "--api_key", KEY, "--served_model_name", "micro", "--feedback_db", "none",
                       log=log) as proc:
        yield {"base": proc.base, "log": log}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path: str, body: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(server["base"] + path, data=json.dumps(body), timeout=120,
                         headers={"Content-Type": "application/json", **AUTH, **(headers or {})})


def scrape(server) -> dict[tuple, float]:
    """/metrics (no key: it is open like /health), parsed: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(server["base"] + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ---------------------------------------------------------------- /metrics

def test_metrics_count_requests_tokens_and_latency_as_the_answers_report_them(server, client):
    before = scrape(server)
    chat = "/v1/chat/completions"
    prompt = completion = 0
    for i in range(3):
        r = client.chat.completions.create(model="micro", messages=[{"role": "user", "content": f"{i} + 1 = ?"}],
                                           max_tokens=3 + i, seed=i)
        prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
    stream = client.chat.completions.create(model="micro", messages=CHAT["messages"], max_tokens=5, stream=True,
                                            stream_options={"include_usage": True})
    last = [c for c in stream][-1]  # include_usage: OpenAI's last chunk, no choices and the usage
    assert last.choices == [] and last.usage.completion_tokens >= 1
    prompt, completion = prompt + last.usage.prompt_tokens, completion + last.usage.completion_tokens
    r = client.completions.create(model="micro", prompt="The answer is", max_tokens=4)
    prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
    assert post(server, chat, {**CHAT, "n": 2}).status_code == 400
    assert post(server, chat, CHAT, {"Authorization": "Bearer wrong"}).status_code == 401
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("coati_requests_total", endpoint=chat, status="200") == 4
    assert delta("coati_requests_total", endpoint=chat, status="400") == 1
    assert delta("coati_requests_total", endpoint=chat, status="401") == 1  # counted outside the key check
    assert delta("coati_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("coati_prompt_tokens_total") == prompt
    assert delta("coati_generation_tokens_total") == completion
    assert delta("coati_request_generation_tokens_sum") == completion
    assert delta("coati_request_latency_seconds_count", endpoint=chat) == 4  # 2xx only
    assert delta("coati_request_latency_seconds_sum", endpoint=chat) > 0
    assert delta("coati_time_to_first_token_seconds_count", endpoint=chat) == 4
    assert delta("coati_time_to_first_token_seconds_count", endpoint="/v1/completions") == 1
    assert delta("coati_finished_requests_total", finish_reason="length") + \
        delta("coati_finished_requests_total", finish_reason="stop") == 5
    # a TTFT is never longer than the whole request it belongs to
    assert delta("coati_time_to_first_token_seconds_sum", endpoint=chat) <= \
        delta("coati_request_latency_seconds_sum", endpoint=chat)
    assert value(after, "coati_requests_in_progress", endpoint=chat) == 0
    # the engine's gauges, read at scrape time: nothing waits or runs once every answer is in
    assert value(after, "coati_queue_depth") == 0 and value(after, "coati_running_rows") == 0
    # each row of a decoding step yields one token of an answer above (or its EOS, which usage does not count)
    assert 0 < delta("coati_engine_steps_total") <= delta("coati_engine_rows_total") <= completion + 5


def test_metrics_show_concurrent_requests_decoded_together(server, client):
    before = scrape(server)

    def ask(i):
        return client.chat.completions.create(model="micro", max_tokens=12, seed=i, temperature=0.8,
                                              messages=[{"role": "user", "content": f"{i} * 3 = ?"}])
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    after = scrape(server)
    steps = value(after, "coati_engine_steps_total") - value(before, "coati_engine_steps_total")
    rows = value(after, "coati_engine_rows_total") - value(before, "coati_engine_rows_total")
    assert steps > 0 and rows / steps > 1, f"{rows} rows over {steps} steps: the 8 requests were not batched"
    assert value(after, "coati_batch_size") > 0
    assert value(after, "coati_generation_tokens_total") - value(before, "coati_generation_tokens_total") == \
        sum(a.usage.completion_tokens for a in answers)


def test_metrics_need_no_key_but_the_host_check_still_applies(server):
    assert requests.get(server["base"] + "/metrics", timeout=10).status_code == 200
    r = requests.get(server["base"] + "/metrics", headers={"Host": "evil.example"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    assert requests.get(server["base"] + "/stats", timeout=10).status_code == 401  # /stats keeps needing the key


def test_an_unknown_v1_path_is_counted_under_one_label(server):
    for path in ("/v1/a", "/v1/b"):
        assert requests.get(server["base"] + path, headers=AUTH, timeout=10).status_code == 404
    samples = scrape(server)
    assert value(samples, "coati_requests_total", endpoint="other", status="404") >= 2
    assert not any(dict(labels).get("endpoint") in ("/v1/a", "/v1/b") for _, labels in samples)


# ---------------------------------------------------------------- parameters: honoured or refused

REFUSED_CHAT = [
    ("n", 2), ("logprobs", True), ("top_logprobs", 2), ("presence_penalty", 0.5), ("frequency_penalty", -1),
    ("logit_bias", {"50256": -100}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("response_format", {"type": "json_object"}), ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy"}),
    ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "high"), ("store", True),
    ("metadata", {"a": "b"}), ("service_tier", "flex"), ("web_search_options", {}), ("verbosity", "low"),
]
REFUSED_COMPLETION = [("best_of", 3), ("echo", True), ("suffix", " end"), ("logprobs", 1), ("n", 2)]


@pytest.mark.parametrize("path,body,param,val", [("/v1/chat/completions", CHAT, p, v) for p, v in REFUSED_CHAT] +
                         [("/v1/completions", COMPLETION, p, v) for p, v in REFUSED_COMPLETION])
def test_an_unsupported_parameter_is_refused_by_name(server, path, body, param, val):
    r = post(server, path, {**body, param: val})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == "unsupported_parameter"
    assert err["message"].startswith(f"{param}: ") and "not supported" in err["message"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", CHAT, "top_k"), ("/v1/chat/completions", CHAT, "repetition_penalty"),
    ("/v1/completions", COMPLETION, "min_p"), ("/v1/chat/completions", CHAT, "messages.0.name"),
])
def test_an_unknown_parameter_is_refused_not_dropped(server, path, body, param):
    if param == "messages.0.name":
        body = {**body, "messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    else:
        body = {**body, param: 1}
    err = post(server, path, body).json()["error"]
    assert err["param"] == param and err["code"] == "unknown_parameter" and param in err["message"]


def test_the_default_value_of_a_refused_parameter_changes_nothing_and_is_accepted(server):
    harmless = {"n": 1, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
                "logit_bias": {}, "tools": [], "tool_choice": "none", "parallel_tool_calls": True,
                "response_format": {"type": "text"}, "modalities": ["text"], "store": False, "service_tier": "auto",
                "user": "someone", "temperature": 0}
    plain = post(server, "/v1/chat/completions", {**CHAT, "temperature": 0})
    r = post(server, "/v1/chat/completions", {**CHAT, **harmless})
    assert plain.status_code == r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]  # greedy: the same answer
    r = post(server, "/v1/completions", {**COMPLETION, "best_of": 1, "echo": False, "suffix": "", "logprobs": None})
    assert r.status_code == 200, r.text


def test_max_completion_tokens_is_honoured_and_must_agree_with_max_tokens(server, client):
    r = client.chat.completions.create(model="micro", messages=CHAT["messages"], max_completion_tokens=3,
                                       temperature=0, n=1, user="u-1")
    assert r.usage.completion_tokens <= 3
    bad = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "max_completion_tokens": 3}).json()["error"]
    assert bad["param"] == "max_completion_tokens" and bad["code"] == "invalid_value"
    bad = post(server, "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}).json()["error"]
    assert bad["param"] == "stream_options"  # only with stream: true, as OpenAI says


def test_the_openai_client_sees_a_refusal_as_a_bad_request_naming_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="micro", messages=CHAT["messages"], max_tokens=2, logprobs=True,
                                       top_logprobs=2)
    assert e.value.body["param"] in ("logprobs", "top_logprobs") and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="micro", messages=CHAT["messages"], max_tokens=2,
                                       extra_body={"top_k": 5})
    assert e.value.body["param"] == "top_k" and e.value.body["code"] == "unknown_parameter"
