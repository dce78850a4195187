"""Built-in verifiers, chosen by name with `--reward_fn`: same signature as a user's reward function.

    math          1.0 when the response's final answer equals the row's `answer` by value, else 0.0
    demo          the demo task's gold scorer (`coati_ray.data.demo.gold_score`)
    format:REGEX  1.0 when the response matches REGEX (`re.search`), else 0.0
"""

from __future__ import annotations

import re
import threading
from typing import Callable

from coati_ray.errors import ConfigError, require
from coati_ray.rewards.functions import RewardError

# The final-answer anchors that come before any LaTeX: GSM8K's "#### N", "The answer is N", "答案是N".
# What follows the anchor (a number, a fraction, LaTeX) and \boxed{...} anywhere are math-verify's to read.
_ANCHORS = (re.compile(r"####\s*(.+?)\s*$", re.MULTILINE),
            re.compile(r"answer is[:\s]*(.+?)\s*(?:[.。]\s*)?$", re.IGNORECASE | re.MULTILINE),
            re.compile(r"答案(?:是|为)[:：\s]*(.+?)\s*(?:[.。]\s*)?$", re.MULTILINE))


def final_answer_text(text: str) -> str:
    """The part of `text` that states the final answer: after the last anchor, else the whole text."""
    for pattern in _ANCHORS:
        found = pattern.findall(text)
        if found:
            return found[-1].replace(",", "")  # "1,234" is a number, not a tuple
    return text


def math_reward(prompts: list[str], responses: list[str], answer: list | None = None, **_) -> list[float]:
    """Compare each response's final answer with the row's `answer` by value (math-verify: numbers,
    fractions, LaTeX, sets; `\\boxed{}` anywhere). A row without an answer is an error, not a 0."""
    mv = require("math_verify", "rewards", "--reward_fn math")
    if answer is None:
        raise RewardError("reward math needs an 'answer' column in the prompts file (the gold final answer, "
                          "e.g. 72 or '#### 72')")
    # math-verify bounds its parsing with signal.alarm, which only the main thread may set
    main = threading.current_thread() is threading.main_thread()
    limit = {"parsing_timeout": 5} if main else {"parsing_timeout": None}
    scores = []
    for response, gold in zip(responses, answer):
        if gold is None or str(gold).strip() == "":
            raise RewardError(f"reward math: a row has an empty 'answer' ({gold!r})")
        g = mv.parse(final_answer_text(str(gold)), **limit)
        p = mv.parse(final_answer_text(response), **limit)
        ok = bool(g and p and mv.verify(g, p, timeout_seconds=5 if main else None))
        scores.append(1.0 if ok else 0.0)
    return scores


def demo_reward(prompts: list[str], responses: list[str], **_) -> list[float]:
    from coati_ray.data.demo import gold_score

    try:
        return [gold_score(p, r) for p, r in zip(prompts, responses)]
    except ValueError as e:  # a prompt the demo task did not write
        raise RewardError(f"reward demo: {e}") from None


def format_reward(pattern: str) -> Callable[..., list[float]]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError("reward_fn", f"format:{pattern}: not a regular expression ({e})") from None

    def reward(prompts: list[str], responses: list[str], **_) -> list[float]:
        return [1.0 if regex.search(r) else 0.0 for r in responses]

    return reward


BUILTINS = {"math": math_reward, "demo": demo_reward}


def builtin(spec: str) -> tuple[str, Callable] | None:
    """(source name, function) for a built-in verifier spec; None when `spec` names a user function."""
    if spec in BUILTINS:
        return spec, BUILTINS[spec]
    if spec.startswith("format:"):
        return "format", format_reward(spec.removeprefix("format:"))
    return None
