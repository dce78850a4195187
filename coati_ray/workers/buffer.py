"""The replay buffer actor: a bounded queue of experience *references*, and the dispatcher that
hands rollout work to a pool of generators that can grow, shrink and crash while a run goes on.

A thin Ray-facing composition of two parts that share one condition variable:
- `experience_queue.ExperienceQueue`: the bounded room (held + reserved samples), back-pressure,
  accepted chunks, and `take` with its staleness drops (plain Python, testable without Ray);
- `dispatcher.RolloutDispatcher`: the step-ordered queue of rollout chunks, the generator pool
  (restarts, re-issue of a dead generator's chunk, add / retire, lost generators) and the
  generators' time accounting.

Holds `ObjectRef`s, never the tensors. The buffer itself calls `generator.rollout` (from the
dispatcher's threads), so it is the *owner* of every chunk a generator returns: Ray keeps an
object as long as its owner lives, so an accepted chunk outlives the generator that made it.
(Ray 2.56 removed `ray.put(_owner=)`; ownership by the caller is the supported way.)

Runs as a threaded Ray actor (`max_concurrency` > 1).
"""

from __future__ import annotations

import threading
from typing import Any

from coati_ray.workers.chunks import ChunkMeta, StepPlan
from coati_ray.workers.dispatcher import RolloutDispatcher
from coati_ray.workers.experience_queue import ExperienceQueue


class ReplayBuffer:
    # produce() calls in flight (max_staleness + 1) + take() + stats() + pool changes: threads
    MAX_CONCURRENCY = 64

    def __init__(self, limit: int, plan: StepPlan, generators: dict[int, Any]):
        self.cond = threading.Condition()  # guards both parts: room, items, work queue and pool
        self.experience = ExperienceQueue(limit, self.cond, on_take=lambda: self.dispatcher.account())
        self.dispatcher = RolloutDispatcher(self.experience, plan, generators)

    # --- the driver's calls --------------------------------------------------------------------------
    def start_at(self, step: int) -> None:
        """The first step to produce (after a resume)."""
        self.dispatcher.start_at(step)

    def produce(self, step: int, min_version: int, ticket: Any, kl_coef: float) -> None:
        """Queue step `step`'s chunks (one per pooled generator) and return once all are accepted.

        `ticket` (a weight-sync ticket, see coati_ray/sync/) goes as is to
        `generator.rollout(chunk, min_version, ticket, kl_coef)`: a generator holding an older
        version than `min_version` brings itself up to date through it before generating.
        """
        self.dispatcher.produce(step, min_version, ticket, kl_coef)

    def take(self, step: int, n_samples: int, min_version: int = 0) -> list[tuple[Any, ChunkMeta]]:
        """Remove and return step `step`'s chunks once `n_samples` of them are in.

        Chunks of earlier steps or with a version below `min_version` are dropped first (counted
        in `dropped_stale`); chunks of later steps stay for their turn.
        """
        return self.experience.take(step, n_samples, min_version)

    # --- the pool --------------------------------------------------------------------------------------
    def generators(self) -> dict[int, Any]:
        """The pooled generators (index -> handle), restarting ones included."""
        return self.dispatcher.generators()

    def add_generators(self, generators: dict[int, Any]) -> None:
        """Pool new generators as soon as each is constructed (returns at once; a generator that
        waits for a node, e.g. while the autoscaler adds one, joins when it starts)."""
        self.dispatcher.add_generators(generators)

    def lost_generators(self) -> list[int]:
        """Generators that died for good (restarts used up) or never started, since the last call."""
        return self.dispatcher.lost_generators()

    def retire_generators(self, indices: list[int]) -> list[int]:
        """Take generators out of the pool; each finishes its chunk in flight first. Returns the
        indices retired (the caller may then kill them). The last generator is never retired."""
        return self.dispatcher.retire_generators(indices)

    def node_id(self) -> str:
        from coati_ray.runtime import current_node_id

        return current_node_id()

    def close(self) -> None:
        self.dispatcher.close()

    def stats(self) -> dict[str, float]:
        with self.cond:
            e, d = self.experience, self.dispatcher
            d.account()
            return {"buffer/fill": e.count, "buffer/reserved": e.reserved, "buffer/limit": e.limit,
                    "buffer/chunks": len(e.items), "buffer/waiting_producers": d.waiting_producers,
                    "buffer/rollouts_dispatched": d.rollouts_dispatched, "buffer/queued_chunks": len(d.queue),
                    "generators/pooled": len(d.pool),
                    **{f"buffer/{k}": v for k, v in {**e.totals, **d.totals}.items()},
                    **d.time.stats()}
