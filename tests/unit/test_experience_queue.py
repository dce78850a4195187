"""The replay buffer's experience queue on its own: plain threads, no Ray, every wait bounded."""

from __future__ import annotations

import threading

import pytest

from coati_ray.workers.chunks import ChunkMeta
from coati_ray.workers.experience_queue import ExperienceQueue

TIMEOUT_S = 30.0  # bound on every wait that is expected to end
BLOCKED_S = 0.05  # a wait that is expected to time out (the state cannot change meanwhile)


def meta(step: int, n: int, version: int = 0, first: int = 0) -> ChunkMeta:
    return ChunkMeta(step, version, list(range(first, first + n)), generator=0)


def put(q: ExperienceQueue, item, m: ChunkMeta) -> None:
    """What the dispatcher does for one chunk: reserve its room, then accept it."""
    q.reserve(m.n, timeout=TIMEOUT_S)
    q.accept(item, m, m.n)


class Call(threading.Thread):
    """`fn()` on its own thread; `outcome()` waits (bounded) for it and returns or raises what it did."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed to the test thread by outcome()
            self.error = e

    def outcome(self):
        self.join(TIMEOUT_S)
        assert not self.is_alive(), f"the call is still blocked after {TIMEOUT_S} s"
        if self.error is not None:
            raise self.error
        return self.result


def started(fn) -> Call:
    c = Call(fn)
    c.start()
    return c


def test_room_counts_held_and_reserved_samples():
    q = ExperienceQueue(limit=8)
    assert q.fits(8) and q.fits(100)  # an empty queue takes even a chunk larger than the limit
    q.reserve(6, timeout=TIMEOUT_S)
    assert q.fits(2) and not q.fits(3)
    q.accept("a", meta(0, 6), 6)
    assert (q.count, q.reserved) == (6, 0) and not q.fits(3)
    q.reserve(2, timeout=TIMEOUT_S)
    q.release(2)  # a failed rollout gives its room back
    assert (q.count, q.reserved) == (6, 0) and q.fits(2)


def test_a_full_queue_makes_the_producer_wait_until_a_take_frees_room():
    q = ExperienceQueue(limit=8)
    put(q, "step0", meta(0, 8))
    with pytest.raises(TimeoutError, match="room for 4 samples"):
        q.reserve(4, timeout=BLOCKED_S)  # full: back-pressure
    producer = started(lambda: put(q, "step1", meta(1, 4, first=8)))
    assert [item for item, _ in q.take(0, 8, timeout=TIMEOUT_S)] == ["step0"]
    producer.outcome()  # room again: the producer got in
    assert [item for item, _ in q.take(1, 4, timeout=TIMEOUT_S)] == ["step1"]
    assert q.totals == {"accepted": 12, "taken": 12, "dropped_stale": 0} and q.count == 0


def test_take_returns_its_own_step_and_leaves_later_steps_for_their_turn():
    q = ExperienceQueue(limit=64)
    put(q, "s1-a", meta(1, 2, first=4))
    put(q, "s0-a", meta(0, 2, first=0))
    waiter = started(lambda: q.take(0, 4, timeout=TIMEOUT_S))
    put(q, "s1-b", meta(1, 2, first=6))
    put(q, "s0-b", meta(0, 2, first=2))  # step 0 complete: the waiter gets both of its chunks, in arrival order
    assert [item for item, _ in waiter.outcome()] == ["s0-a", "s0-b"]
    assert q.count == 4 and [item for item, _ in q.items] == ["s1-a", "s1-b"]
    taken = q.take(1, 4, timeout=TIMEOUT_S)
    assert sorted(i for _, m in taken for i in m.sample_ids) == [4, 5, 6, 7]


def test_take_drops_and_counts_chunks_of_earlier_steps_and_older_weights():
    q = ExperienceQueue(limit=64)
    put(q, "s0", meta(0, 2))
    put(q, "s1-v0", meta(1, 2, version=0))
    put(q, "s2-v0", meta(2, 2, version=0))
    (item, _), = q.take(1, 2, min_version=0, timeout=TIMEOUT_S)
    assert item == "s1-v0" and q.totals["dropped_stale"] == 2  # the never-taken step 0
    # A trainer at v1 drops step 2 (made with v0) and keeps waiting for newer samples.
    with pytest.raises(TimeoutError, match="2 samples of step 2"):
        q.take(2, 2, min_version=1, timeout=BLOCKED_S)
    assert q.totals["dropped_stale"] == 4 and q.count == 0 and q.items == []
    waiter = started(lambda: q.take(2, 2, min_version=1, timeout=TIMEOUT_S))
    put(q, "s2-v1", meta(2, 2, version=1))
    assert [item for item, _ in waiter.outcome()] == ["s2-v1"]
    assert q.totals == {"accepted": 8, "taken": 4, "dropped_stale": 4}


def test_a_failure_reaches_every_waiter_and_every_later_call():
    q = ExperienceQueue(limit=4)
    put(q, "full", meta(0, 4))
    takers = [started(lambda: q.take(0, 8, timeout=TIMEOUT_S)) for _ in range(2)]  # more than step 0 has
    producer = started(lambda: q.reserve(4, timeout=TIMEOUT_S))  # blocked: no room
    boom = RuntimeError("a generator failed")
    q.fail(boom)
    for c in (*takers, producer):
        with pytest.raises(RuntimeError, match="a generator failed"):
            c.outcome()
    with pytest.raises(RuntimeError, match="a generator failed"):
        q.take(0, 4, timeout=TIMEOUT_S)  # even a step that is complete: the run has failed


def test_on_take_runs_under_the_lock_before_the_items_change():
    seen = []
    q = ExperienceQueue(limit=8)
    q.on_take = lambda: seen.append((q.cond._is_owned(), q.count))
    put(q, "a", meta(0, 3))
    q.take(0, 3, timeout=TIMEOUT_S)
    assert seen == [(True, 3)]
