"""The replay buffer actor: a bounded queue of experience *references* between generators and trainers.

- Holds `ObjectRef`s, never the tensors. The buffer itself calls `generator.rollout`, so it is
  the *owner* of every chunk a generator returns: Ray keeps an object as long as its owner lives,
  so an accepted chunk outlives the generator that made it. (Ray 2.56 removed `ray.put(_owner=)`;
  ownership by the caller is the supported way.)
- Bounded in samples: a rollout is dispatched to a generator only when the buffer has room for
  its samples, so a full buffer makes producers wait and nothing piles up in Ray's call queues.
- Every chunk carries its PPO step, the weight version that produced it and its sample ids;
  `take` hands a step's chunks to the trainers and drops (and counts) ones older than allowed.

Runs as a threaded Ray actor (`max_concurrency` > 1): a `produce` call holds one thread while it
waits for room and for its rollout; one condition variable guards all state. Concurrent calls
may start in any order, so rollouts are dispatched strictly in step order (`next_dispatch`):
otherwise step s + 1 could take the room step s needs while the trainer waits for step s.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


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


class ReplayBuffer:
    # produce() calls in flight (max_staleness + 1) + take() + stats(): threads, not a queue
    MAX_CONCURRENCY = 64

    def __init__(self, limit: int, generators: list, samples_per_step: list[int]):
        self.limit = limit
        self.generators = generators
        self.samples_per_step = samples_per_step  # per generator: its share of one step's samples
        self.items: list[tuple[Any, ChunkMeta]] = []  # (ObjectRef, meta), arrival order
        self.count = 0  # samples held
        self.reserved = 0  # samples being generated into reserved room
        self.cond = threading.Condition()
        self.waiting_producers = 0
        self.rollouts_dispatched = 0
        self.next_dispatch = 0  # the step whose rollouts go out next
        self.error: BaseException | None = None
        self.totals = {"accepted": 0, "taken": 0, "dropped_stale": 0}

    def _fits(self, n: int) -> bool:
        # A chunk larger than the whole buffer still goes into an empty one: slow, not deadlocked.
        used = self.count + self.reserved
        return used == 0 or used + n <= self.limit

    def start_at(self, step: int) -> None:
        """The first step to produce (after a resume)."""
        with self.cond:
            self.next_dispatch = step
            self.cond.notify_all()

    def produce(self, step: int, min_version: int, weights: list, kl_coef: float, steps_per_episode: int) -> None:
        """Have every generator make its share of step `step`, each as soon as there is room for it.

        `weights` = [ObjectRef of a WeightUpdate] (a list so Ray does not resolve it here): a
        generator holding an older version than `min_version` loads it before generating.
        Generators are served in order; each rollout is dispatched once its room is reserved.
        """
        pending = []
        active = [(g, n) for g, n in enumerate(self.samples_per_step) if n]
        for j, (g, n) in enumerate(active):
            with self.cond:
                def may_go() -> bool:
                    return step == self.next_dispatch and self._fits(n)

                if not may_go():
                    self.waiting_producers += 1
                    self.cond.wait_for(may_go)
                    self.waiting_producers -= 1
                self.reserved += n
                self.rollouts_dispatched += 1
                exp_ref, meta_ref = self.generators[g].rollout.options(num_returns=2).remote(
                    step, min_version, weights, kl_coef, steps_per_episode)
                if j == len(active) - 1:
                    self.next_dispatch = step + 1
                    self.cond.notify_all()
            pending.append((n, exp_ref, meta_ref))
        for n, exp_ref, meta_ref in pending:
            self._accept(n, exp_ref, meta_ref)

    def _accept(self, n: int, exp_ref, meta_ref) -> None:
        import ray

        try:
            meta: ChunkMeta = ray.get(meta_ref)
        except BaseException as e:  # the rollout failed: make take() raise it instead of waiting forever
            with self.cond:
                self.reserved -= n
                self.error = e
                self.cond.notify_all()
            raise
        with self.cond:
            self.reserved -= n
            self.items.append((exp_ref, meta))
            self.count += meta.n
            self.totals["accepted"] += meta.n
            self.cond.notify_all()

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
            out = [(r, m) for r, m in self.items if m.step == step]
            self.items = [(r, m) for r, m in self.items if m.step != step]
            n = sum(m.n for _, m in out)
            self.count -= n
            self.totals["taken"] += n
            self.cond.notify_all()
            return out

    def stats(self) -> dict[str, float]:
        with self.cond:
            return {"buffer/fill": self.count, "buffer/reserved": self.reserved, "buffer/limit": self.limit,
                    "buffer/chunks": len(self.items), "buffer/waiting_producers": self.waiting_producers,
                    "buffer/rollouts_dispatched": self.rollouts_dispatched,
                    **{f"buffer/{k}": v for k, v in self.totals.items()}}
