"""The experience queue: the replay buffer's bounded store of accepted rollout chunks.

Plain Python, no Ray: an item is opaque (in the buffer, the `ObjectRef` of an `Experience`
chunk) and travels with its `ChunkMeta`. Room is counted in samples:
- `count` samples are held, `reserved` more are being generated into room set aside for them;
  `fits(n)` is the back-pressure rule: the dispatcher issues a chunk only once it fits, so a
  full queue makes producers wait and nothing piles up elsewhere.
- `reserve(n)` sets room aside, `accept` turns it into a held chunk, `release` gives it back (a
  rollout that failed).
- `take(step, n, min_version)` waits until step `step` has `n` samples in, then removes and
  returns its chunks; chunks of earlier steps, or made with weights older than `min_version`,
  are dropped first (and counted in `dropped_stale`). Chunks of later steps stay for their turn.
- `fail(e)`: every waiter, now and later, raises `e`.

One `threading.Condition` (shared with the dispatcher in the buffer) guards all state. Every
method takes it, so a caller may already hold it: its lock must be reentrant (that of a plain
`threading.Condition()` is). Blocking calls take a `timeout` (None: wait as long as it takes)
and raise `TimeoutError` saying what they waited for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from coati_ray.workers.chunks import ChunkMeta


class ExperienceQueue:
    def __init__(self, limit: int, cond: threading.Condition | None = None,
                 on_take: Callable[[], None] | None = None):
        """`limit`: samples the queue holds (held + reserved). `on_take` is called under the lock just
        before `take` changes what is held (the buffer accounts generator time there)."""
        self.limit = limit
        self.cond = cond if cond is not None else threading.Condition()
        self.on_take = on_take
        self.items: list[tuple[Any, ChunkMeta]] = []  # (item, meta), arrival order
        self.count = 0  # samples held
        self.reserved = 0  # samples being generated into reserved room
        self.error: BaseException | None = None
        self.totals = {"accepted": 0, "taken": 0, "dropped_stale": 0}

    def _wait(self, predicate: Callable[[], bool], timeout: float | None, what: str) -> None:
        if not self.cond.wait_for(predicate, timeout):
            raise TimeoutError(f"experience queue: waited {timeout:g} s for {what}")

    # --- room ----------------------------------------------------------------------------------------
    def fits(self, n: int) -> bool:
        """True when a chunk of `n` samples has room. A chunk larger than the whole queue still goes
        into an empty one: slow, not deadlocked."""
        with self.cond:
            used = self.count + self.reserved
            return used == 0 or used + n <= self.limit

    def reserve(self, n: int, timeout: float | None = None) -> None:
        """Set room aside for a chunk of `n` samples, waiting while there is none (back-pressure).
        Raises the queue's error if it fails while this waits."""
        with self.cond:
            self._wait(lambda: self.fits(n) or self.error is not None, timeout, f"room for {n} samples")
            if not self.fits(n):
                raise self.error
            self.reserved += n

    def release(self, n: int) -> None:
        """Give back room reserved for `n` samples (their rollout failed)."""
        with self.cond:
            self.reserved -= n
            self.cond.notify_all()

    def accept(self, item: Any, meta: ChunkMeta, reserved: int) -> None:
        """Hold `item` (a finished chunk) in the room that was reserved for `reserved` samples."""
        with self.cond:
            self.reserved -= reserved
            self.items.append((item, meta))
            self.count += meta.n
            self.totals["accepted"] += meta.n
            self.cond.notify_all()

    # --- the consumer ----------------------------------------------------------------------------------
    def _drop_stale(self, step: int, min_version: int) -> None:
        keep = []
        for item, m in self.items:
            if m.step < step or m.version < min_version:
                self.count -= m.n
                self.totals["dropped_stale"] += m.n
            else:
                keep.append((item, m))
        self.items = keep

    def take(self, step: int, n_samples: int, min_version: int = 0,
             timeout: float | None = None) -> list[tuple[Any, ChunkMeta]]:
        """Remove and return step `step`'s chunks once `n_samples` of them are in (see the module doc)."""
        with self.cond:
            def ready() -> bool:
                self._drop_stale(step, min_version)
                return self.error is not None or sum(m.n for _, m in self.items if m.step == step) >= n_samples

            self._wait(ready, timeout, f"{n_samples} samples of step {step}")
            if self.error is not None:
                raise self.error
            if self.on_take is not None:
                self.on_take()
            out = [(r, m) for r, m in self.items if m.step == step]
            self.items = [(r, m) for r, m in self.items if m.step != step]
            n = sum(m.n for _, m in out)
            self.count -= n
            self.totals["taken"] += n
            self.cond.notify_all()
            return out

    # --- failure ---------------------------------------------------------------------------------------
    def fail(self, e: BaseException) -> None:
        """Make every waiter (now and later) raise `e`."""
        with self.cond:
            self.error = e
            self.cond.notify_all()
