"""A continuously batching text-generation engine over a transformers causal LM, for the chat server.

Requests queue up; a worker thread keeps one running batch (left-padded, with a KV cache) and, between
decoding steps, admits every waiting request as new rows (up to `max_batch_size`): their prompts are
prefilled together, their caches left-padded to the running one's length and joined to it along the
batch. Finished or cancelled rows leave the batch at once, and columns that only padding fills any
more are cut off. A request that arrives mid-answer therefore starts within one step instead of
waiting for the whole batch to finish (issue 19; figures in docs/serving.md). When idle, the first
request waits `batch_wait_s` for stragglers so that a burst is prefilled as one batch.

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
        if self.done:  # a finished row riding along in a batch that cannot drop rows (static batching)
            return
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
        # batches: prefills (groups of requests admitted together); steps: decoding steps of the running batch
        self.counters = {"batches": 0, "requests": 0, "max_batch": 0, "tokens": 0, "steps": 0, "rows_total": 0}
        # The running batch, owned by the engine thread: B rows, L cached positions
        self._rows: list[_Row] = []
        self._cache = None  # a DynamicCache: per layer keys/values (B, heads, L, head_dim)
        self._mask = torch.zeros((0, 0), dtype=torch.long)  # (B, L) 1 = a real token, 0 = left padding
        self._next_pos = torch.zeros(0, dtype=torch.long)  # (B,) position of each row's next token
        self._last = torch.zeros(0, dtype=torch.long)  # (B,) each row's last sampled token, the next input
        # False once the model's cache turns out to hold layers that cannot be cut and joined along L
        # (sliding-window layers: Mistral, Gemma 2/3): the engine then batches statically, admitting
        # requests only into an empty batch and keeping finished rows until the batch ends.
        self.continuous = True
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def submit(self, req: GenRequest) -> None:
        self.queue.put(req)

    def stats(self) -> dict:
        """The counters, plus requests waiting (`queue_depth`) and rows in the running batch (`running`).
        `rows_total / steps` is the mean batch size of a decoding step."""
        return {**self.counters, "queue_depth": self.queue.qsize(), "running": len(self._rows)}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _room(self) -> int:
        """Rows that may join the running batch now."""
        if self._rows and not self.continuous:
            return 0
        return self.max_batch_size - len(self._rows)

    def _waiting(self) -> list[GenRequest]:
        """Requests to admit now: all that wait (up to the room left); when idle, block for the first one and
        give stragglers `batch_wait_s`."""
        new: list[GenRequest] = []
        if not self._rows:
            new.append(self.queue.get())
            deadline = time.monotonic() + self.batch_wait_s
            while len(new) < self._room():
                try:
                    new.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        while len(new) < self._room():
            try:
                new.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return new

    def _loop(self) -> None:
        while True:
            taken = self._waiting()
            self.counters["requests"] += len(taken)  # counted as taken even when its client is gone already
            new = [r for r in taken if not r.cancelled.is_set()]  # ... which gets no row
            if new and self._guard(new, self._admit, new):
                self._retire()
            if self._rows and self._guard([r.req for r in self._rows if not r.done], self._step):
                self._retire()

    def _guard(self, reqs: list[GenRequest], work, *args) -> bool:
        """Run `work`; if it fails (a bug, out of memory), tell `reqs` and keep serving. A failed prefill leaves
        the running batch as it was; a failed step ends it."""
        try:
            work(*args)
            return True
        except Exception as e:
            logger.exception("generation failed for %d requests", len(reqs))
            for r in reqs:
                r.emit(Event(f"{type(e).__name__}: {e}", "error"))
            if work == self._step:
                self._clear()
            return False

    def _clear(self) -> None:
        self._rows, self._cache = [], None
        self._mask, self._next_pos, self._last = self._mask[:0, :0], self._next_pos[:0], self._last[:0]

    @torch.no_grad()
    def _admit(self, reqs: list[GenRequest]) -> None:
        """Prefill `reqs` as one left-padded batch, sample each one's first token, join them to the running batch."""
        rows = [_Row(r, self.eos) for r in reqs]
        P = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), P), self.pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), P), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, P - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, P - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        tokens = self._sample(out.logits[:, -1, :].float(), rows)
        for row, t in zip(rows, tokens):
            row.add(t, self._decode)
        c = self.counters
        c["batches"], c["tokens"] = c["batches"] + 1, c["tokens"] + len(rows)
        last, next_pos = torch.tensor(tokens, device=self.device), mask.sum(-1)
        if not self._rows:
            self._cache, self._mask, self._next_pos, self._last = out.cache, mask, next_pos, last
            if self.continuous and not joinable(out.cache):
                self.continuous = False
                logger.warning("the model's KV cache has %s layers, which cannot be cut and joined: batching "
                               "statically (requests wait for the running batch to end)",
                               sorted({type(layer).__name__ for layer in out.cache.layers}))
        else:  # left-pad the shorter cache so both end at the same column, then stack the rows
            L, n = self._mask.shape[1], mask.shape[1]
            self._cache, self._mask = _join(_pad_left(self._cache, self._mask, n - L),
                                            _pad_left(out.cache, mask, L - n))
            self._next_pos, self._last = torch.cat([self._next_pos, next_pos]), torch.cat([self._last, last])
        self._rows += rows
        c["max_batch"] = max(c["max_batch"], len(self._rows))

    @torch.no_grad()
    def _step(self) -> None:
        """One decoding step of every running row."""
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        out = self.model(input_ids=self._last[:, None], attention_mask=self._mask,
                         position_ids=self._next_pos[:, None], cache=self._cache, use_cache=True)
        self._cache, self._next_pos = out.cache, self._next_pos + 1
        tokens = self._sample(out.logits[:, -1, :].float(), self._rows)
        for row, t in zip(self._rows, tokens):
            row.add(t, self._decode)
        self._last = torch.tensor(tokens, device=self.device)
        c, B = self.counters, len(self._rows)
        c["steps"], c["rows_total"], c["tokens"] = c["steps"] + 1, c["rows_total"] + B, c["tokens"] + B

    def _retire(self) -> None:
        """Drop finished and cancelled rows (a cancelled one gets no more events), and the columns left to padding."""
        for r in self._rows:
            if r.req.cancelled.is_set():
                r.done = True
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            return self._clear()
        if not self.continuous:  # finished rows stay (they sample nothing more) until the batch ends
            return
        idx = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[idx]
        first = int(mask.any(0).long().argmax())  # the first column some remaining row uses
        self._mask, self._next_pos, self._last = mask[:, first:], self._next_pos[idx], self._last[idx]
        for layer in _layers(self._cache):
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]

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


def joinable(cache) -> bool:
    """Whether every layer of the cache is a plain growing one (`_layers` can cut and join it)."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)


def _layers(cache) -> list:
    """The cache's layers, each holding `keys` and `values` of shape (B, heads, L, head_dim). Only plain growing
    layers can be cut and joined along L; a sliding-window cache would need its own bookkeeping."""
    layers = cache.layers
    if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise NotImplementedError(f"continuous batching needs a DynamicCache of DynamicLayers, got "
                                  f"{sorted({type(layer).__name__ for layer in layers})}")
    return layers


def _pad_left(cache, mask: torch.Tensor, n: int):
    """Prepend `n` padding columns (zero keys/values, mask 0) to a batch's cache; n <= 0 leaves it as is."""
    if n <= 0:
        return cache, mask
    for layer in _layers(cache):
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, n, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, n, 0))
    return cache, torch.cat([mask.new_zeros((mask.shape[0], n)), mask], dim=1)


def _join(a: tuple, b: tuple) -> tuple:
    """Stack two (cache, mask) batches of the same length L along the batch: b's rows after a's."""
    (cache, mask), (other, other_mask) = a, b
    for layer, o in zip(_layers(cache), _layers(other)):
        layer.keys, layer.values = torch.cat([layer.keys, o.keys]), torch.cat([layer.values, o.values])
    return cache, torch.cat([mask, other_mask])
