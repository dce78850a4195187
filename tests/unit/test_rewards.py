"""Reward sources without Ray: functions from files and modules, the built-in verifiers, the reward
server client against real HTTP servers on 127.0.0.1, weights, and every bad input's one line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from coati_ray.errors import ConfigError
from coati_ray.rewards.functions import RewardBatch, RewardError, call_reward_function, load_function
from coati_ray.rewards.remote import RemoteReward
from coati_ray.rewards.sources import reward_specs, weighted_total
from coati_ray.rewards.verifiers import final_answer_text, format_reward, math_reward

ROOT = Path(__file__).resolve().parents[2]


def batch(responses, **columns) -> RewardBatch:
    return RewardBatch([f"p{i}" for i in range(len(responses))], list(responses), columns,
                       [100 + i for i in range(len(responses))])


def write(tmp_path, text: str) -> str:
    f = tmp_path / "rewards.py"
    f.write_text(text)
    return str(f)


# --- functions --------------------------------------------------------------------------------------

def test_a_function_from_a_file_gets_prompts_responses_and_the_rows_columns(tmp_path):
    f = write(tmp_path, "def score(prompts, responses, answer, weight):\n"
                        "    return [float(r == a) * w for r, a, w in zip(responses, answer, weight)]\n")
    fn = load_function(f"{f}:score")
    out = call_reward_function(fn, "f", batch(["4", "5", "6"], answer=["4", "x", "6"], weight=[1, 2, 0.5]))
    assert out == [1.0, 0.0, 0.5]


def test_an_async_function_is_awaited_and_a_module_function_loads(tmp_path):
    f = write(tmp_path, "import asyncio\nasync def score(prompts, responses, **cols):\n"
                        "    await asyncio.sleep(0)\n    return [len(r) for r in responses]\n")
    assert call_reward_function(load_function(f"{f}:score"), "f", batch(["ab", ""])) == [2.0, 0.0]
    assert load_function("json:dumps") is json.dumps


@pytest.mark.parametrize("body,expected", [
    ("def score(p, r, **c):\n    return [1.0]\n", "reward f returned 1 rewards for 3 samples"),
    ("def score(p, r, **c):\n    return [1.0, 'x', 2]\n",
     "reward f returned str 'x' for sample 101; expected a number"),
    ("def score(p, r, **c):\n    return [1.0, float('nan'), 2]\n", "reward f returned nan for sample 101"),
    ("def score(p, r, **c):\n    return 3\n", "reward f returned int; expected a list of 3 numbers"),
    ("def score(p, r, **c):\n    return [1 / len(x) for x in r]\n",
     "reward f raised on sample 102: ZeroDivisionError: division by zero"),
])
def test_a_function_that_misbehaves_is_one_line_naming_the_sample(tmp_path, body, expected):
    fn = load_function(f"{write(tmp_path, body)}:score")
    with pytest.raises(RewardError) as e:
        call_reward_function(fn, "f", batch(["a", "bb", ""]))
    assert str(e.value) == expected or str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_reward_flags_are_refused_before_anything_runs(tmp_path):
    f = write(tmp_path, "raise SystemExit('must not run in the driver')\ndef score(p, r):\n    return []\n")
    assert [s.name for s in reward_specs(None, f"{f}:score", None, None)] == ["score"]  # checked, not run
    cases = [
        ((None, f"{tmp_path}/missing.py:score", None, None), f"--reward_fn: {tmp_path}/missing.py: no such file"),
        ((None, f"{f}:other", None, None), f"--reward_fn: {f} defines no 'other' (it defines: score)"),
        ((None, "no_such_module_xyz:f", None, None), "--reward_fn: no module named 'no_such_module_xyz'"),
        ((None, "score", None, None), "--reward_fn: expected 'path/to/file.py:function'"),
        ((None, "format:([", None, None), "--reward_fn: format:([: not a regular expression"),
        ((None, None, "ftp://x", None), "--reward_url: expected an http:// or https:// URL"),
        (("rm", "math", None, "1,2,3"), "--reward_weights: 3 weights for 2 reward sources (rm, math, in that order)"),
        (("rm", None, None, "a"), "--reward_weights: expected comma-separated numbers"),
    ]
    for args, expected in cases:
        with pytest.raises(ConfigError) as e:
            reward_specs(*args)
        assert str(e.value).startswith(expected), (args, str(e.value))


def test_weights_sum_the_sources_in_order():
    specs = reward_specs("out/rm", "math", "http://127.0.0.1:1/score", "0.5,1,-2")
    assert [(s.kind, s.name, s.weight) for s in specs] == [("rm", "rm", 0.5), ("fn", "math", 1.0),
                                                           ("remote", "remote", -2.0)]
    total = weighted_total({"rm": torch.tensor([2.0, 4.0]), "math": torch.tensor([1.0, 0.0]),
                            "remote": torch.tensor([0.25, 1.0])}, specs)
    assert total.tolist() == [1.0 + 1.0 - 0.5, 2.0 + 0.0 - 2.0]


# --- verifiers --------------------------------------------------------------------------------------

def test_final_answer_anchors():
    assert final_answer_text("so 3 + 4 = 7\n#### 7") == "7"
    assert final_answer_text("7 + 3 = 10. The answer is 10.") == "10"
    assert final_answer_text("5 + 2 = 7。答案是7。") == "7"
    assert final_answer_text("#### 1,234") == "1234"
    assert final_answer_text("we get \\boxed{\\frac{1}{2}}") == "we get \\boxed{\\frac{1}{2}}"  # math-verify's


def test_math_compares_final_answers_by_value():
    responses = ["3 + 4 = 7\n#### 7", "The answer is 0.5.", "答案是12。", "\\boxed{\\frac{3}{4}}", "The answer is 8.",
                 "no answer here"]
    answer = ["#### 7", "\\frac{1}{2}", "12", "0.75", "9", "3"]
    assert math_reward([""] * 6, responses, answer=answer) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match="reward math needs an 'answer' column"):
        math_reward(["p"], ["7"])
    with pytest.raises(RewardError, match="a row has an empty 'answer'"):
        math_reward(["p"], ["7"], answer=[None])


def test_format_and_demo_verifiers():
    import random

    from coati_ray.data.demo import make_problem
    from coati_ray.rewards.verifiers import demo_reward

    assert format_reward(r"^<think>.*</think>")(["", ""], ["<think>a</think> 4", "4"]) == [1.0, 0.0]
    p = make_problem(random.Random(0))
    right = "The answer is {}." if p.lang == "en" else "答案是{}。"
    assert demo_reward([p.text, p.text], [right.format(p.answer), right.format(p.answer + 1)]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="reward demo: not a demo arithmetic prompt"):
        demo_reward(["What is love?"], ["x"])


# --- the reward server client ---------------------------------------------------------------------

class Flaky(BaseHTTPRequestHandler):
    """Answers each request by the next item of `script`: an HTTP status, 'hang', 'garbage' or 'ok'."""

    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        action = type(self).script.pop(0) if type(self).script else "ok"
        if action == "hang":
            time.sleep(1.5)  # longer than the client's timeout: the client gives up on this request
            return
        if isinstance(action, int):
            self.send_response(action)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        data = b"{not json" if action == "garbage" else json.dumps(
            {"rewards": [float(len(r)) for r in body["responses"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    Flaky.script, Flaky.seen = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def test_the_client_cuts_a_batch_into_bounded_parts_and_keeps_the_order(flaky):
    client = RemoteReward(flaky, timeout_s=5, retries=0, max_inflight=3)
    out = client(batch(["a", "bb", "ccc", "dddd", "eeeee", "", "g"], answer=list("1234567")))
    assert out == [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 1.0]
    assert sorted(len(b["responses"]) for b in Flaky.seen) == [1, 3, 3]  # 3 requests at most
    assert sorted(b["sample_ids"][0] for b in Flaky.seen) == [100, 103, 106]
    assert all(set(b) == {"prompts", "responses", "columns", "sample_ids"} for b in Flaky.seen)
    client.close()


def test_transient_failures_are_retried_with_backoff(flaky, caplog):
    Flaky.script = [503, "hang", 429]  # then ok
    client = RemoteReward(flaky, timeout_s=0.5, retries=3, max_inflight=1, backoff_s=0.01)
    assert client(batch(["ab", "c"])) == [2.0, 1.0]
    assert client.retried == 3 and len(Flaky.seen) == 4
    assert "HTTP 503; trying again" in caplog.text and "no answer within 0.5 s" in caplog.text
    client.close()


@pytest.mark.parametrize("script,expected", [
    (["garbage"], "answered with something that is not JSON"),
    ([400], "answered HTTP 400 for samples from 100: busy"),
    ([503, 503], "HTTP 503 for samples from 100, after 2 tries"),
])
def test_a_server_that_keeps_failing_is_one_clear_error(flaky, script, expected):
    Flaky.script = list(script)
    client = RemoteReward(flaky, timeout_s=2, retries=1, max_inflight=1, backoff_s=0.01)
    with pytest.raises(RewardError, match=expected):
        client(batch(["a", "b"]))
    client.close()


def test_a_server_that_is_down_is_reported_after_the_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    client = RemoteReward(f"http://127.0.0.1:{port}/score", timeout_s=1, retries=2, backoff_s=0.01)
    with pytest.raises(RewardError, match=r"cannot connect \(ConnectionError\) for samples from 100, after 3 tries"):
        client(batch(["a"]))
    client.close()


def test_the_example_server_scores_with_a_verifier(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "reward_server.py"), "--reward_fn", "math",
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 60
        while True:  # until the server answers its health check (bounded)
            try:
                if requests.get(f"{url}/health", timeout=1).json() == {"ok": True}:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "reward server did not start in 60 s"
            time.sleep(0.2)
        client = RemoteReward(f"{url}/score", timeout_s=10, retries=0)
        assert client(batch(["#### 7", "The answer is 3."], answer=["7", "4"])) == [1.0, 0.0]
        r = requests.post(f"{url}/score", json={"prompts": ["p"], "responses": ["7"], "columns": {}}, timeout=10)
        assert r.status_code == 422 and "reward math needs an 'answer' column" in r.text
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
