"""Example reward functions for `--reward_fn examples/reward_functions.py:NAME` (stage 3).

A reward function gets the prompts (as the dataset has them), the sampled responses and the prompt
rows' other columns, one value per sample, and returns one number per sample. It runs inside the
reward actors; an `async def` is awaited.
"""

from __future__ import annotations


def answer_and_brevity(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """The demo task: 1 for the right final answer ("The answer is N" / "答案是N"), minus 0.01 per
    character past 40 (a shaping term a verifier alone does not have)."""
    from coati_ray.data.demo import gold_score

    return [gold_score(p, r) - 0.01 * max(0, len(r) - 40) for p, r in zip(prompts, responses)]


def exact_answer_column(prompts: list[str], responses: list[str], answer: list, **columns) -> list[float]:
    """Any prompts file with an `answer` column: 1 when the response's last line is the answer, as text."""
    return [float(r.strip().splitlines()[-1].strip() == str(a).strip()) if r.strip() else 0.0
            for r, a in zip(responses, answer)]
