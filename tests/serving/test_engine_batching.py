"""The chat server's engine batches continuously (issue 19): a request that arrives while others
decode joins the running batch between two steps, with the same answer it would get alone, and a
finished or cancelled request leaves its row at once. The real engine on the micro llama preset."""

from __future__ import annotations

import threading
import time
import warnings

import pytest

from coati_ray.serve.engine import BatchingEngine, Event, GenRequest


@pytest.fixture
def engine(micro_model, tokenizer):
    from coati_ray.models.loading import load_causal_lm

    return BatchingEngine(load_causal_lm(micro_model), tokenizer, max_batch_size=8)


class Answer:
    """One request's events as the engine thread emits them."""

    def __init__(self, engine: BatchingEngine, tokenizer, prompt: str | list[int], max_tokens: int, **sampling):
        self.events: list[Event] = []
        self.done = threading.Event()
        self.finished_at = 0.0
        ids = prompt if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        self.req = GenRequest(ids, max_tokens, self._emit, **sampling)
        engine.submit(self.req)

    def _emit(self, ev: Event) -> None:
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.finished_at = time.monotonic()
            self.done.set()

    def result(self, timeout: float = 120) -> tuple[str, str]:
        assert self.done.wait(timeout), f"no answer within {timeout}s; events so far: {self.events}"
        return "".join(e.text for e in self.events), self.events[-1].finish_reason


def wait_for(pred, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.002)


LONG = "Tell me a long story."  # the micro model's greedy answer runs past 300 tokens without EOS
PROMPTS = [("hello", {"temperature": 0}),
           ("小明有3个苹果，又买了5个。一共有多少个？ " * 3, {"temperature": 0}),  # longer than the running cache
           ("What is 2 + 3?", {"temperature": 0.9, "top_p": 0.8, "seed": 7}),
           ("Write a poem about rain.", {"temperature": 1.0, "seed": 11, "stop": ["the", "of"]})]


def test_a_request_arriving_mid_answer_joins_the_batch_and_finishes_first(engine, tokenizer):
    long = Answer(engine, tokenizer, LONG, 300, temperature=0)
    wait_for(lambda: long.events, "the long answer's first text")
    short = Answer(engine, tokenizer, "hello", 4, temperature=0)
    text, reason = short.result()
    assert reason == "length" and text
    assert not long.done.is_set(), "the short request waited for the long one, as a static batch would"
    assert long.result()[1] == "length", "precondition: the long answer runs to max_tokens"
    wait_for(lambda: engine.stats()["running"] == 0, "the batch to empty")
    s = engine.stats()
    assert s["batches"] == 2 and s["requests"] == 2 and s["max_batch"] == 2
    assert s["steps"] < s["rows_total"] < 2 * s["steps"]  # some steps ran both rows, most ran the long one alone


def test_answers_are_the_same_alone_and_joined_mid_batch(engine, tokenizer):
    alone = []
    for prompt, sampling in PROMPTS:
        alone.append(Answer(engine, tokenizer, prompt, 24, **sampling).result())
    long = Answer(engine, tokenizer, LONG, 300, temperature=0)
    wait_for(lambda: len(long.events) >= 3, "the long answer's third piece")
    joined = [Answer(engine, tokenizer, prompt, 24, **sampling) for prompt, sampling in PROMPTS]
    assert [a.result() for a in joined] == alone  # greedy, seeded sampling and stop strings alike
    assert not long.done.is_set() and engine.stats()["max_batch"] >= 2
    long.req.cancelled.set()
    wait_for(lambda: engine.stats()["running"] == 0, "the long row to leave")
    assert all("the" not in text and "of" not in text for text, _ in alone[3:])


def test_a_cancelled_request_frees_its_row_and_gets_no_more_text(engine, tokenizer):
    a = Answer(engine, tokenizer, LONG, 300, temperature=0)
    wait_for(lambda: engine.stats()["running"] == 1, "the request's row")
    a.req.cancelled.set()
    wait_for(lambda: engine.stats()["running"] == 0, "the cancelled row to leave the batch")
    n = len(a.events)
    assert not a.done.is_set() and a.events[-1].finish_reason is None
    assert Answer(engine, tokenizer, "hello", 3, temperature=0).result()[1] == "length"  # the engine serves on
    assert len(a.events) == n
    batches, gone_events = engine.stats()["batches"], []
    gone = GenRequest(tokenizer("hello")["input_ids"], 4, gone_events.append)
    gone.cancelled.set()  # its client left while it waited: it is taken off the queue but never prefilled
    engine.submit(gone)
    wait_for(lambda: engine.stats()["requests"] == 3, "the engine to take the third request")
    assert engine.stats()["batches"] == batches and not gone_events


def test_rows_never_exceed_max_batch_size_and_stats_count_the_steps(micro_model, tokenizer):
    from coati_ray.models.loading import load_causal_lm

    engine = BatchingEngine(load_causal_lm(micro_model), tokenizer, max_batch_size=2)
    answers = [Answer(engine, tokenizer, f"{i} + {i} = ?", 5 + 3 * i, temperature=0) for i in range(5)]
    assert all(a.result()[1] in ("stop", "length") for a in answers)
    wait_for(lambda: engine.stats()["running"] == 0, "the batch to empty")
    s = engine.stats()
    assert s["requests"] == 5 and s["max_batch"] == 2 and s["queue_depth"] == 0
    assert s["steps"] <= s["rows_total"] <= 2 * s["steps"]
    assert s["tokens"] == sum(e.completion_tokens for a in answers for e in a.events if e.finish_reason) + sum(
        1 for a in answers if a.events[-1].finish_reason == "stop")  # an EOS is sampled but not counted as text


def test_no_deprecated_cache_argument_warning(engine, tokenizer):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Answer(engine, tokenizer, "hello", 4, temperature=0).result()
    assert not [w for w in seen if "past_key_values" in str(w.message)]


def test_a_failed_prefill_answers_error_and_the_running_rows_go_on(engine, tokenizer):
    long = Answer(engine, tokenizer, LONG, 60, temperature=0)
    wait_for(lambda: long.events, "the long answer's first text")
    bad = Answer(engine, tokenizer, [5, 10**9], 4, temperature=0)  # no such token: the prefill's lookup raises
    text, reason = bad.result()
    assert reason == "error" and "IndexError" in text
    assert long.result() == Answer(engine, tokenizer, LONG, 60, temperature=0).result()  # as if alone


def test_a_sliding_window_model_is_batched_statically_and_answers_every_request(tokenizer):
    """Mistral's cache layers (DynamicSlidingWindowLayer) cannot be cut and joined: the engine says so once,
    admits requests only into an empty batch and keeps finished rows until the batch ends, and nothing hangs."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=8,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = MistralForCausalLM(cfg)
    engine = BatchingEngine(model, tokenizer, max_batch_size=8)
    long = Answer(engine, tokenizer, LONG, 40, temperature=0)
    short = Answer(engine, tokenizer, "hello", 3, temperature=0)  # may join the first batch or wait for it
    wait_for(lambda: engine.counters["steps"] >= 1, "the first decoding step")
    late = Answer(engine, tokenizer, "What is 2 + 3?", 5, temperature=0)  # arrives mid-batch
    alone = BatchingEngine(model, tokenizer, max_batch_size=8)  # the same weights, its own thread
    expected = Answer(alone, tokenizer, "What is 2 + 3?", 5, temperature=0).result()
    assert long.result()[1] in ("length", "stop") and short.result()[1] in ("length", "stop")
    assert late.result() == expected  # the same greedy answer as alone
    assert engine.continuous is False
    assert late.finished_at >= long.finished_at  # static: it waited for the running batch to end
    assert engine.stats()["queue_depth"] == 0
