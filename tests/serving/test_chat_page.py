"""The chat page in headless Chromium (Playwright, Debian's /usr/bin/chromium) against the real server
on the micro model: the temperature and max-tokens controls reach the request and bound the answer,
the welcome text, the API-key placeholder fits its field, English and Chinese exchanges.

`COATI_SCREENSHOT_DIR=bench pytest tests/serving/test_chat_page.py` also writes the screenshots
bench/chat_page_en.png and bench/chat_page_zh.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests

KEY = "page-key-321"
MEASURE_PLACEHOLDER = """() => {
  const el = document.getElementById("key"), cs = getComputedStyle(el);
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = cs.font;
  return [ctx.measureText(el.placeholder).width,
          el.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight)];
}"""


@pytest.fixture(scope="module")
def server(micro_model, tmp_path_factory):
    from coati_ray.serve.process import ServerProcess

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(micro_model, "--api_key", KEY, "--served_model_name", "micro", "--feedback_db", "none",
                       log=log) as proc:
        yield {"base": proc.base}


def greedy_answer(server, messages: list[dict], max_tokens: int) -> dict:
    r = requests.post(server["base"] + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "micro", "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()


def ask(page, text: str, n: int) -> tuple[dict, str]:
    """Type and send a message; (the request body the page sent, the answer it shows when done)."""
    page.fill("#input", text)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    answer = page.locator(".assistant").nth(n)
    answer.and_(page.locator("[data-done='true']")).wait_for(timeout=60_000)
    return json.loads(sent.value.post_data), answer.text_content()


@pytest.mark.parametrize("width", [1280, 420])
def test_the_api_key_placeholder_fits_its_field(server, browser, width):
    page = browser.new_page(viewport={"width": width, "height": 800})
    try:
        page.goto(server["base"] + "/")
        text_px, room_px = page.evaluate(MEASURE_PLACEHOLDER)
        assert text_px <= room_px, f"at {width} px the placeholder needs {text_px:.0f} px, the field has {room_px}"
        for control in ("#key", "#temperature", "#max_tokens", "#clear"):  # nothing pushed off screen
            box = page.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, control
    finally:
        page.close()


def test_temperature_and_max_tokens_controls_reach_the_request_and_bound_the_answer(server, browser):
    shots = os.environ.get("COATI_SCREENSHOT_DIR")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(server["base"] + "/")
        assert "Chat with micro" in page.locator("#welcome").text_content()
        page.fill("#key", KEY)
        page.focus("#temperature")
        page.keyboard.press("Home")  # the slider's minimum, as a user would: greedy decoding
        assert page.locator("#temperature_value").text_content() == "0.0"
        page.fill("#max_tokens", "5")
        question = "Hello! What is 2 + 3?"
        body, shown = ask(page, question, 0)
        assert body["temperature"] == 0 and body["max_tokens"] == 5
        assert page.locator("#welcome").count() == 0  # the conversation replaced the welcome text
        # greedy and 5 tokens: exactly what the API answers to the same request
        expected = greedy_answer(server, [{"role": "user", "content": question}], 5)
        assert expected["usage"]["completion_tokens"] <= 5
        assert shown == expected["choices"][0]["message"]["content"]

        page.focus("#temperature")
        for _ in range(3):
            page.keyboard.press("ArrowRight")  # 0.0 -> 0.3
        page.fill("#max_tokens", "40")
        body, _ = ask(page, "And 4 + 4?", 1)
        assert body["temperature"] == pytest.approx(0.3) and body["max_tokens"] == 40
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        if shots:
            page.screenshot(path=str(Path(shots) / "chat_page_en.png"))

        page.click("#clear")  # a new chat: the welcome text is back, the history gone
        assert page.locator("#welcome").count() == 1 and page.locator(".msg").count() == 0
        page.fill("#max_tokens", "60")
        body, shown = ask(page, "小明有3个苹果，又买了5个。一共有多少个？", 0)
        assert [m["role"] for m in body["messages"]] == ["user"] and body["max_tokens"] == 60 and shown.strip()
        assert page.locator(".user").all_text_contents() == ["小明有3个苹果，又买了5个。一共有多少个？"]
        if shots:
            page.screenshot(path=str(Path(shots) / "chat_page_zh.png"))
    finally:
        page.close()
