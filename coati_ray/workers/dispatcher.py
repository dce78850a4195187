"""The rollout dispatcher: hands a queue of rollout chunks to a pool of generators that can grow,
shrink and crash while a run goes on.

- Work is a queue of chunks (`chunks.Chunk`: a slice of one step's prompts, with its sample ids
  fixed by the slice). `produce(step)` queues a step's chunks, one per pooled generator; a
  dispatcher thread gives the queue's head to an idle generator once the experience queue has
  room for its samples (back-pressure), and the thread that awaits the rollout hands the finished
  chunk to the experience queue. The caller of `generator.rollout` owns what it returns: here,
  the replay buffer actor.
- Chunks go out strictly in step order: otherwise step s + 1 could take the room step s needs
  while the trainer waits for step s.
- A generator that dies with a chunk in flight: the chunk goes back to the head of the queue
  (same sample ids, same seed), and the generator rejoins the pool once Ray has restarted it
  (its next rollout loads the current weights first). Nothing is lost or made twice: a chunk
  is accepted once, by the thread that dispatched it.
- `add_generators` / `retire_generators` change the pool at run time; a retiring generator
  finishes its chunk first.
- `time` accounts generator-seconds: busy, idle with nothing allowed to run (waiting on
  weights), idle on a full experience queue.

All state is guarded by the experience queue's condition variable (one lock for both).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from coati_ray.workers.chunks import (
    Chunk,
    ChunkMeta,
    StepPlan,
    make_chunks,
    step_prompts,
)
from coati_ray.workers.experience_queue import ExperienceQueue

logger = logging.getLogger(__name__)

RESTART_TIMEOUT_S = 900.0  # a restarting generator reloads its engine (a vLLM engine: about a minute)
MAX_ATTEMPTS = 5  # a chunk whose generator died this many times fails the run (something is wrong)
IDLE_WAKE_S = 60.0  # the dispatcher's wait for work is bounded: it looks again this often


@dataclass
class _Gen:
    handle: Any
    chunk: Chunk | None = None  # in flight
    state: str = "idle"  # idle | busy | restarting | retiring
    chunks_done: int = 0


@dataclass
class _Request:
    chunk: Chunk
    min_version: int
    weights: Any  # the weight-sync ticket (coati_ray/sync/), passed as is to generator.rollout
    kl_coef: float
    attempts: int = 0

    def key(self) -> tuple[int, int]:
        return self.chunk.step, self.chunk.index


def _is_actor_death(e: BaseException) -> bool:
    """True when `e` says an actor died (this generator, or a scorer it called) rather than a bug."""
    import ray

    while isinstance(e, ray.exceptions.RayTaskError) and not isinstance(e, ray.exceptions.RayActorError):
        if e.cause is None:
            return False
        e = e.cause
    return isinstance(e, ray.exceptions.RayActorError)  # ActorDiedError, ActorUnavailableError


class GeneratorTime:
    """Generator-seconds: busy, idle with nothing allowed to run (waiting on weights), idle on a full buffer."""

    def __init__(self):
        self.seconds = {"busy": 0.0, "wait_weights": 0.0, "wait_buffer": 0.0}
        self.last = time.perf_counter()

    def add(self, busy: int, idle: int, buffer_full: bool) -> None:
        """Count the time since the last call: `busy` generators working, `idle` ones waiting."""
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        self.seconds["busy"] += busy * dt
        if idle:
            self.seconds["wait_buffer" if buffer_full else "wait_weights"] += idle * dt

    def stats(self) -> dict[str, float]:
        total = sum(self.seconds.values()) or 1.0
        return {**{f"generators/{k}_s": v for k, v in self.seconds.items()},
                "generators/wait_weights_share": self.seconds["wait_weights"] / total,
                "generators/wait_buffer_share": self.seconds["wait_buffer"] / total}


class RolloutDispatcher:
    def __init__(self, experience: ExperienceQueue, plan: StepPlan, generators: dict[int, Any]):
        self.experience, self.plan = experience, plan
        self.cond = experience.cond
        self.pool: dict[int, _Gen] = {i: _Gen(h) for i, h in generators.items()}
        self.queue: list[_Request] = []  # sorted by (step, chunk index)
        self.waiting_producers = 0
        self.rollouts_dispatched = 0
        self.next_queue = 0  # the step whose chunks are queued next
        self.pending: dict[int, int] = {}  # step -> chunks not yet accepted
        self.totals = {"reissued": 0, "generator_restarts": 0, "generators_added": 0, "generators_retired": 0}
        self.lost: list[int] = []  # generators gone for good, not yet reported
        self.time = GeneratorTime()
        self.closed = False
        threading.Thread(target=self._dispatch_loop, name="dispatch", daemon=True).start()

    def _wait(self, predicate, timeout: float | None, what: str) -> None:
        if not self.cond.wait_for(predicate, timeout):
            raise TimeoutError(f"rollout dispatcher: waited {timeout:g} s for {what}")

    def account(self) -> None:
        """Count generator time up to now (call under the lock, before any change of state)."""
        with self.cond:
            busy = sum(g.state in ("busy", "retiring") and g.chunk is not None for g in self.pool.values())
            idle = sum(g.state == "idle" for g in self.pool.values())
            full = bool(self.queue) and not self.experience.fits(self.queue[0].chunk.size)
            self.time.add(busy, idle, full)

    # --- the dispatcher thread -----------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        with self.cond:
            while not self.closed:
                def ready() -> bool:
                    return self.closed or (bool(self.queue) and self.experience.fits(self.queue[0].chunk.size)
                                           and any(g.state == "idle" for g in self.pool.values()))

                if not self.cond.wait_for(ready, IDLE_WAKE_S):
                    continue  # nothing to dispatch yet: look again
                if self.closed:
                    return
                self.account()
                req = self.queue.pop(0)
                gi = min((g.chunks_done, i) for i, g in self.pool.items() if g.state == "idle")[1]
                g = self.pool[gi]
                g.state, g.chunk = "busy", req.chunk
                self.experience.reserve(req.chunk.size)  # it fits: ready() said so, under this lock
                self.rollouts_dispatched += 1
                refs = g.handle.rollout.options(num_returns=2).remote(req.chunk, req.min_version, req.weights,
                                                                       req.kl_coef)
                threading.Thread(target=self._await_rollout, args=(gi, g, req, *refs), daemon=True).start()

    def _await_rollout(self, gi: int, g: _Gen, req: _Request, exp_ref, meta_ref) -> None:
        import ray

        try:
            meta: ChunkMeta = ray.get(meta_ref)
        except BaseException as e:
            with self.cond:
                self.account()
                self.experience.release(req.chunk.size)
                g.chunk = None
                if not _is_actor_death(e) or req.attempts + 1 >= MAX_ATTEMPTS:
                    self.experience.fail(e)
                    return
                # The generator (or a scorer it called) died: issue the chunk again, first in line.
                req.attempts += 1
                self.totals["reissued"] += req.chunk.size
                bisect.insort(self.queue, req, key=_Request.key)
                retiring = g.state == "retiring"
                g.state = "restarting"
                self.cond.notify_all()
            logger.warning("buffer: rollout of step %d chunk %d on generator-%d failed (%s); issued again",
                           req.chunk.step, req.chunk.index, gi, type(e).__name__)
            self._await_restart(gi, g, retiring)
            return
        with self.cond:
            self.account()
            self.experience.accept(exp_ref, meta, req.chunk.size)
            self.pending[req.chunk.step] -= 1
            g.chunk = None
            g.chunks_done += 1
            if g.state == "busy":
                g.state = "idle"
            self.cond.notify_all()

    def _await_restart(self, gi: int, g: _Gen, retiring: bool) -> None:
        """Wait until Ray has restarted generator `gi` (its constructor ran again), then pool it again."""
        from coati_ray.runtime import get_restartable

        try:
            get_restartable(g.handle.weight_version.remote, RESTART_TIMEOUT_S)
            alive = True
        except BaseException as e:  # restarts used up (or never back): the generator is gone for good
            logger.warning("buffer: generator-%d did not come back (%s); %d left", gi, e, len(self.pool) - 1)
            alive = False
        with self.cond:
            self.account()
            if alive and not retiring:
                g.state = "idle"
                self.totals["generator_restarts"] += 1
            else:
                self.pool.pop(gi, None)
                if not alive and not retiring:  # (a retiring one is reported by retire_generators)
                    self.lost.append(gi)
            if not self.pool and self.queue:
                self.experience.fail(RuntimeError("every generator died; no rollout can run"))
            self.cond.notify_all()

    # --- steps ---------------------------------------------------------------------------------------
    def start_at(self, step: int) -> None:
        with self.cond:
            self.next_queue = step
            self.cond.notify_all()

    def produce(self, step: int, min_version: int, weights: Any, kl_coef: float,
                timeout: float | None = None) -> None:
        """Queue step `step`'s chunks (one per pooled generator, after the previous step's) and
        return once all are accepted; raises the experience queue's error if the run fails."""
        p = self.plan
        rows = step_prompts(step, p.n_prompts, p.experience_batch_size, p.seed)
        exp = self.experience
        with self.cond:
            self._wait(lambda: step == self.next_queue or exp.error is not None, timeout, f"step {step}'s turn")
            if exp.error is not None:
                raise exp.error
            self.account()
            chunks = make_chunks(step, rows, sum(g.state != "retiring" for g in self.pool.values()), p.n_samples)
            self.pending[step] = len(chunks)
            for c in chunks:
                bisect.insort(self.queue, _Request(c, min_version, weights, kl_coef), key=_Request.key)
            self.next_queue = step + 1
            self.cond.notify_all()

            def done() -> bool:
                return self.pending[step] == 0 or exp.error is not None

            if not done():
                self.waiting_producers += 1
                try:
                    self._wait(done, timeout, f"step {step}'s chunks to be accepted")
                finally:
                    self.waiting_producers -= 1
            del self.pending[step]
            if exp.error is not None:
                raise exp.error

    # --- the pool ------------------------------------------------------------------------------------
    def generators(self) -> dict[int, Any]:
        """The pooled generators (index -> handle), restarting ones included."""
        with self.cond:
            return {i: g.handle for i, g in self.pool.items() if g.state != "retiring"}

    def add_generators(self, generators: dict[int, Any]) -> None:
        """Pool new generators as soon as each is constructed (returns at once)."""
        for i, h in generators.items():
            threading.Thread(target=self._join, args=(i, h), daemon=True).start()

    def _join(self, i: int, handle) -> None:
        import ray

        try:
            ray.get(handle.weight_version.remote())
        except BaseException as e:
            logger.warning("buffer: new generator-%d failed to start: %s", i, e)
            with self.cond:
                self.lost.append(i)
            return
        with self.cond:
            self.account()
            self.pool[i] = _Gen(handle)
            self.totals["generators_added"] += 1
            self.cond.notify_all()

    def lost_generators(self) -> list[int]:
        """Generators that died for good (restarts used up) or never started, since the last call."""
        with self.cond:
            lost, self.lost = self.lost, []
            return lost

    def retire_generators(self, indices: list[int], timeout: float | None = None) -> list[int]:
        """Take generators out of the pool; each finishes its chunk in flight first. Returns the
        indices retired. The last generator is never retired."""
        with self.cond:
            self.account()
            keep = [i for i, g in self.pool.items() if g.state != "retiring" and i not in indices]
            if not keep:
                raise ValueError("cannot retire every generator: at least one must stay")
            gone = [i for i in indices if i in self.pool and self.pool[i].state != "retiring"]
            for i in gone:
                self.pool[i].state = "retiring"
            self.cond.notify_all()
            self._wait(lambda: all(i not in self.pool or self.pool[i].chunk is None for i in gone), timeout,
                       f"generators {gone} to finish their chunks")
            self.account()
            for i in gone:
                self.pool.pop(i, None)
            self.totals["generators_retired"] += len(gone)
            return gone

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
