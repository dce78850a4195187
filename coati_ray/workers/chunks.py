"""Chunk scheduling: which prompts a PPO step trains on, and how a step is cut into rollout chunks.

Plain data and pure functions (no Ray, no torch), shared by the replay buffer, which queues
and dispatches chunks, the generators, which make them, and the driver, which counts steps.

- `step_prompts(step, ...)`: a step's prompt rows, a function of (seed, step) alone.
- `make_chunks(step, rows, ...)`: a step's rows cut into `Chunk`s, one rollout request each,
  with sample ids fixed by the chunk's place in the step (so a chunk issued again after a
  generator died makes the same ids).
- `ChunkMeta`: what a generator reports with a finished chunk; `StepPlan`: what the buffer needs
  to cut steps into chunks.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field


def prompts_per_step(experience_batch_size: int, index: int, num_chunks: int) -> int:
    """Prompts in chunk `index` of a step split `num_chunks` ways (the first chunks take the remainder)."""
    q, r = divmod(experience_batch_size, num_chunks)
    return q + (index < r)


def steps_per_episode(n_prompts: int, experience_batch_size: int) -> int:
    return n_prompts // experience_batch_size


def step_prompts(step: int, n_prompts: int, experience_batch_size: int, seed: int) -> list[int]:
    """The prompt rows of PPO step `step`: a seeded shuffle per episode, cut into steps.

    A function of (seed, step) alone: which generator samples them, and how many generators
    there are, does not change what a step trains on (so generators can come and go, and a
    resumed run samples what the original did).
    """
    spe = steps_per_episode(n_prompts, experience_batch_size)
    episode, k = divmod(step, spe)
    return list(_episode_order(n_prompts, seed, episode)[k * experience_batch_size:(k + 1) * experience_batch_size])


@functools.lru_cache(maxsize=2)  # the current episode (and the next, at a boundary): one shuffle each
def _episode_order(n_prompts: int, seed: int, episode: int) -> tuple[int, ...]:
    order = list(range(n_prompts))
    random.Random(seed * 7919 + episode * 104729).shuffle(order)
    return tuple(order)


@dataclass(frozen=True)
class Chunk:
    """One rollout request: a slice of a step's prompts. Sample ids follow from the slice's place in
    the step, not from the generator that makes it, so a chunk issued again makes the same ids."""

    step: int
    index: int  # chunk index within the step (also seeds the sampling)
    rows: tuple[int, ...]  # prompt rows
    first_slot: int  # step * experience_batch_size + the prompts of the chunks before this one
    n_samples: int  # responses per prompt

    @property
    def size(self) -> int:
        return len(self.rows) * self.n_samples

    def sample_ids(self) -> list[int]:
        n = self.n_samples
        return [(self.first_slot + j // n) * n + j % n for j in range(self.size)]


def make_chunks(step: int, rows: list[int], num_chunks: int, n_samples: int) -> list[Chunk]:
    """Split step `step`'s prompt rows into `num_chunks` chunks (fewer when there are fewer prompts)."""
    num_chunks = max(1, min(num_chunks, len(rows)))
    out, at = [], 0
    for c in range(num_chunks):
        k = prompts_per_step(len(rows), c, num_chunks)
        out.append(Chunk(step, c, tuple(rows[at:at + k]), step * len(rows) + at, n_samples))
        at += k
    return out


@dataclass
class ChunkMeta:
    step: int  # the PPO step whose prompts these are
    version: int  # policy weight version that generated them
    sample_ids: list[int]
    generator: int
    stats: dict[str, float] = field(default_factory=dict)  # small per-chunk sums and timings
    # the chunk's first sample as text, {"prompt", "response", "reward"}: the trackers' sample table
    samples: list[dict] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class StepPlan:
    """What the buffer needs to cut steps into chunks (see `step_prompts`): how many prompts there
    are, how many a step takes, the samples per prompt, and the seed of each episode's shuffle."""

    n_prompts: int
    experience_batch_size: int
    n_samples: int
    seed: int
