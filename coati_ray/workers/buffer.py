"""The replay buffer actor: a bounded queue of experience *references*, and the dispatcher that
hands rollout work to a pool of generators that can grow, shrink and crash while a run goes on.

- Holds `ObjectRef`s, never the tensors. The buffer itself calls `generator.rollout`, so it is
  the *owner* of every chunk a generator returns: Ray keeps an object as long as its owner lives,
  so an accepted chunk outlives the generator that made it. (Ray 2.56 removed `ray.put(_owner=)`;
  ownership by the caller is the supported way.)
- Work is a queue of chunks (`generator.Chunk`: a slice of one step's prompts, with its sample
  ids fixed by the slice). `produce(step)` queues a step's chunks; a dispatcher thread gives the
  queue's head to an idle generator once the buffer has room for its samples. A full buffer makes
  producers wait; nothing piles up in Ray's call queues.
- Chunks go out strictly in step order: otherwise step s + 1 could take the room step s needs
  while the trainer waits for step s.
- A generator that dies with a chunk in flight: the chunk goes back to the head of the queue
  (same sample ids, same seed), and the generator rejoins the pool once Ray has restarted it
  (its next rollout loads the current weights first). Nothing is lost or made twice: a chunk
  is accepted once, by the thread that dispatched it.
- `add_generators` / `retire_generators` change the pool at run time; a retiring generator
  finishes its chunk first.
- Every chunk carries its PPO step, the weight version that produced it and its sample ids;
  `take` hands a step's chunks to the trainers and drops (and counts) ones older than allowed.

Runs as a threaded Ray actor (`max_concurrency` > 1): one condition variable guards all state.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from coati_ray.workers.generator import Chunk, make_chunks, step_prompts

logger = logging.getLogger(__name__)

RESTART_TIMEOUT_S = 900.0  # a restarting generator reloads its engine (a vLLM engine: about a minute)
MAX_ATTEMPTS = 5  # a chunk whose generator died this many times fails the run (something is wrong)


@dataclass
class ChunkMeta:
    step: int  # the PPO step whose prompts these are
    version: int  # policy weight version that generated them
    sample_ids: list[int]
    generator: int
    stats: dict[str, float] = field(default_factory=dict)  # small per-chunk sums and timings

    @property
    def n(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class StepPlan:
    """What the buffer needs to cut steps into chunks (see `generator.step_prompts`)."""

    n_prompts: int
    experience_batch_size: int
    n_samples: int
    seed: int


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
    weights: list
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


class ReplayBuffer:
    # produce() calls in flight (max_staleness + 1) + take() + stats() + pool changes: threads
    MAX_CONCURRENCY = 64

    def __init__(self, limit: int, plan: StepPlan, generators: dict[int, Any]):
        self.limit, self.plan = limit, plan
        self.pool: dict[int, _Gen] = {i: _Gen(h) for i, h in generators.items()}
        self.queue: list[_Request] = []  # sorted by (step, chunk index)
        self.items: list[tuple[Any, ChunkMeta]] = []  # (ObjectRef, meta), arrival order
        self.count = 0  # samples held
        self.reserved = 0  # samples being generated into reserved room
        self.cond = threading.Condition()
        self.waiting_producers = 0
        self.rollouts_dispatched = 0
        self.next_queue = 0  # the step whose chunks are queued next
        self.pending: dict[int, int] = {}  # step -> chunks not yet accepted
        self.error: BaseException | None = None
        self.totals = {"accepted": 0, "taken": 0, "dropped_stale": 0, "reissued": 0, "generator_restarts": 0,
                       "generators_added": 0, "generators_retired": 0}
        self.lost: list[int] = []  # generators gone for good, not yet reported to the driver
        # generator-seconds: busy, idle with nothing allowed to run (waiting on weights), idle on a full buffer
        self.time = {"busy": 0.0, "wait_weights": 0.0, "wait_buffer": 0.0}
        self.last_account = time.perf_counter()
        self.closed = False
        threading.Thread(target=self._dispatch_loop, name="dispatch", daemon=True).start()

    # --- bookkeeping (all under self.cond) ----------------------------------------------------------
    def _fits(self, n: int) -> bool:
        # A chunk larger than the whole buffer still goes into an empty one: slow, not deadlocked.
        used = self.count + self.reserved
        return used == 0 or used + n <= self.limit

    def _account(self) -> None:
        now = time.perf_counter()
        dt, self.last_account = now - self.last_account, now
        busy = sum(g.state in ("busy", "retiring") and g.chunk is not None for g in self.pool.values())
        idle = sum(g.state == "idle" for g in self.pool.values())
        self.time["busy"] += busy * dt
        if idle:
            full = bool(self.queue) and not self._fits(self.queue[0].chunk.size)
            self.time["wait_buffer" if full else "wait_weights"] += idle * dt

    def _fail(self, e: BaseException) -> None:
        self.error = e
        self.cond.notify_all()

    # --- the dispatcher ------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        with self.cond:
            while not self.closed:
                def ready() -> bool:
                    return self.closed or (bool(self.queue) and self._fits(self.queue[0].chunk.size)
                                           and any(g.state == "idle" for g in self.pool.values()))

                self.cond.wait_for(ready)
                if self.closed:
                    return
                self._account()
                req = self.queue.pop(0)
                gi = min((g.chunks_done, i) for i, g in self.pool.items() if g.state == "idle")[1]
                g = self.pool[gi]
                g.state, g.chunk = "busy", req.chunk
                self.reserved += req.chunk.size
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
                self._account()
                self.reserved -= req.chunk.size
                g.chunk = None
                if not _is_actor_death(e) or req.attempts + 1 >= MAX_ATTEMPTS:
                    self._fail(e)
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
            self._account()
            self.reserved -= req.chunk.size
            self.items.append((exp_ref, meta))
            self.count += meta.n
            self.totals["accepted"] += meta.n
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
            self._account()
            if alive and not retiring:
                g.state = "idle"
                self.totals["generator_restarts"] += 1
            else:
                self.pool.pop(gi, None)
                if not alive and not retiring:  # (a retiring one is reported by retire_generators)
                    self.lost.append(gi)
            if not self.pool and self.queue:
                self._fail(RuntimeError("every generator died; no rollout can run"))
            self.cond.notify_all()

    # --- the driver's calls --------------------------------------------------------------------------
    def start_at(self, step: int) -> None:
        """The first step to produce (after a resume)."""
        with self.cond:
            self.next_queue = step
            self.cond.notify_all()

    def produce(self, step: int, min_version: int, weights: list, kl_coef: float) -> None:
        """Queue step `step`'s chunks (one per pooled generator) and return once all are accepted.

        `weights` = [ObjectRef of a WeightUpdate] (a list so Ray does not resolve it here): a
        generator holding an older version than `min_version` loads it before generating.
        """
        p = self.plan
        rows = step_prompts(step, p.n_prompts, p.experience_batch_size, p.seed)
        with self.cond:
            self.cond.wait_for(lambda: step == self.next_queue or self.error is not None)
            if self.error is not None:
                raise self.error
            self._account()
            chunks = make_chunks(step, rows, sum(g.state != "retiring" for g in self.pool.values()), p.n_samples)
            self.pending[step] = len(chunks)
            for c in chunks:
                bisect.insort(self.queue, _Request(c, min_version, weights, kl_coef), key=_Request.key)
            self.next_queue = step + 1
            self.cond.notify_all()

            def done() -> bool:
                return self.pending[step] == 0 or self.error is not None

            if not done():
                self.waiting_producers += 1
                self.cond.wait_for(done)
                self.waiting_producers -= 1
            del self.pending[step]
            if self.error is not None:
                raise self.error

    def take(self, step: int, n_samples: int, min_version: int = 0) -> list[tuple[Any, ChunkMeta]]:
        """Remove and return step `step`'s chunks once `n_samples` of them are in.

        Chunks of earlier steps or with a version below `min_version` are dropped first (counted
        in `dropped_stale`); chunks of later steps stay for their turn.
        """
        with self.cond:
            def drop_stale() -> None:
                keep = []
                for ref, m in self.items:
                    if m.step < step or m.version < min_version:
                        self.count -= m.n
                        self.totals["dropped_stale"] += m.n
                    else:
                        keep.append((ref, m))
                self.items = keep

            def ready() -> bool:
                drop_stale()
                return self.error is not None or sum(m.n for _, m in self.items if m.step == step) >= n_samples

            self.cond.wait_for(ready)
            if self.error is not None:
                raise self.error
            self._account()
            out = [(r, m) for r, m in self.items if m.step == step]
            self.items = [(r, m) for r, m in self.items if m.step != step]
            n = sum(m.n for _, m in out)
            self.count -= n
            self.totals["taken"] += n
            self.cond.notify_all()
            return out

    # --- the pool --------------------------------------------------------------------------------------
    def generators(self) -> dict[int, Any]:
        """The pooled generators (index -> handle), restarting ones included."""
        with self.cond:
            return {i: g.handle for i, g in self.pool.items() if g.state != "retiring"}

    def add_generators(self, generators: dict[int, Any]) -> None:
        """Pool new generators as soon as each is constructed (returns at once; a generator that
        waits for a node, e.g. while the autoscaler adds one, joins when it starts)."""
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
            self._account()
            self.pool[i] = _Gen(handle)
            self.totals["generators_added"] += 1
            self.cond.notify_all()

    def lost_generators(self) -> list[int]:
        """Generators that died for good (restarts used up) or never started, since the last call."""
        with self.cond:
            lost, self.lost = self.lost, []
            return lost

    def retire_generators(self, indices: list[int]) -> list[int]:
        """Take generators out of the pool; each finishes its chunk in flight first. Returns the
        indices retired (the caller may then kill them). The last generator is never retired."""
        with self.cond:
            self._account()
            keep = [i for i, g in self.pool.items() if g.state != "retiring" and i not in indices]
            if not keep:
                raise ValueError("cannot retire every generator: at least one must stay")
            gone = [i for i in indices if i in self.pool and self.pool[i].state != "retiring"]
            for i in gone:
                self.pool[i].state = "retiring"
            self.cond.notify_all()
            self.cond.wait_for(lambda: all(i not in self.pool or self.pool[i].chunk is None for i in gone))
            self._account()
            for i in gone:
                self.pool.pop(i, None)
            self.totals["generators_retired"] += len(gone)
            return gone

    def node_id(self) -> str:
        from coati_ray.runtime import current_node_id

        return current_node_id()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def stats(self) -> dict[str, float]:
        with self.cond:
            self._account()
            total = sum(self.time.values()) or 1.0
            return {"buffer/fill": self.count, "buffer/reserved": self.reserved, "buffer/limit": self.limit,
                    "buffer/chunks": len(self.items), "buffer/waiting_producers": self.waiting_producers,
                    "buffer/rollouts_dispatched": self.rollouts_dispatched, "buffer/queued_chunks": len(self.queue),
                    "generators/pooled": len(self.pool),
                    **{f"buffer/{k}": v for k, v in self.totals.items()},
                    **{f"generators/{k}_s": v for k, v in self.time.items()},
                    "generators/wait_weights_share": self.time["wait_weights"] / total,
                    "generators/wait_buffer_share": self.time["wait_buffer"] / total}
