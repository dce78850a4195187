"""A batching text-generation engine over a transformers causal LM, for the chat server.

Requests queue up; a worker thread takes every waiting request (up to `max_batch_size`, after a
short `batch_wait_s` for stragglers), runs them as one left-padded batch with a KV cache, and
streams each row's text as it grows. Requests that arrive while a batch runs go into the next
one: concurrent clients are batched, never serialised one by one.

Per row: temperature (0 = greedy), top-p, max tokens, stop strings, a seed. Text is decoded from
all of a row's tokens each step and only the part that can no longer change is sent (an
incomplete UTF-8 character, e.g. half of a Chinese character, or the start of a stop string is
held back).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class Event:
    """A piece of one request's answer: new text, and at the end why it stopped."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]  # called from the engine thread
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that must wait: a partial character or a stop string's start."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class _Row:
    def __init__(self, req: GenRequest, eos: int):
        self.req, self.eos = req, eos
        self.ids: list[int] = []
        self.sent = 0  # characters of the answer emitted so far
        self.done = False
        self.gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None

    def add(self, token: int, decode) -> None:
        """Take one sampled token; emit what is final; finish on EOS, a stop string or max tokens."""
        if token == self.eos:
            return self.finish(decode(self.ids), "stop")
        self.ids.append(token)
        text = decode(self.ids)
        for s in self.req.stop:
            at = text.find(s)
            if at >= 0:
                return self.finish(text[:at], "stop")
        if len(self.ids) >= self.req.max_tokens:
            return self.finish(text, "length")
        safe = len(text) - _held_back(text, self.req.stop)
        if safe > self.sent:
            self.req.emit(Event(text[self.sent:safe]))
            self.sent = safe

    def finish(self, text: str, reason: str) -> None:
        self.done = True
        self.req.emit(Event(text[self.sent:].replace("\ufffd", ""), reason, len(self.req.prompt_ids), len(self.ids)))


class BatchingEngine:
    def __init__(self, model, tokenizer, max_batch_size: int = 32, batch_wait_s: float = 0.005):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        if self.pad is None:
            self.pad = self.eos
        self.queue: queue.Queue[GenRequest] = queue.Queue()
        self.stats = {"batches": 0, "requests": 0, "max_batch": 0, "tokens": 0}
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def submit(self, req: GenRequest) -> None:
        self.queue.put(req)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._run(batch)
            except Exception as e:  # a bug or an engine failure: tell every waiting client, keep serving
                logger.exception("generation failed for a batch of %d", len(batch))
                for r in batch:
                    r.emit(Event(f"{type(e).__name__}: {e}", "error"))

    @torch.no_grad()
    def _run(self, batch: list[GenRequest]) -> None:
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        rows = [_Row(r, self.eos) for r in batch]
        P = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), P), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), P), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, P - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, P - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
        past = None
        for _ in range(max(r.max_tokens for r in batch)):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                             use_cache=True)
            past = out.past_key_values
            tokens = self._sample(out.logits[:, -1, :].float(), rows)
            for row, t in zip(rows, tokens):
                if not row.done:
                    if row.req.cancelled.is_set():
                        row.done = True
                        continue
                    row.add(t, self._decode)
                    self.stats["tokens"] += 1
            if all(r.done for r in rows):
                return
            ids = torch.tensor([[t if not r.done else self.pad] for r, t in zip(rows, tokens)], device=self.device)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        for r in rows:  # every row stops by max_tokens at the latest; this is a guard
            if not r.done:
                r.finish(self._decode(r.ids), "length")

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """(B, V) -> one token per row under that row's temperature and top-p."""
        out = []
        for row, lg in zip(rows, logits):
            t, top_p = row.req.temperature, row.req.top_p
            if row.done or t == 0:
                out.append(int(lg.argmax()))
                continue
            scaled = lg / t
            if not torch.isfinite(scaled).all():  # a temperature so small that logits overflow: that is greedy
                out.append(int(lg.argmax()))
                continue
            probs = torch.softmax(scaled, dim=-1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            out.append(int(torch.multinomial(probs, 1, generator=row.gen)))
        return out
