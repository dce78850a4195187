"""Conversations: read message lists exactly, render them with the chat template, mask the assistant turns.

Formats read (detected per turn, so one file may mix them):

| format | a turn | roles |
|---|---|---|
| OpenAI / TRL `messages` | `{"role": ..., "content": ...}` | system, user, assistant |
| ShareGPT `conversations` | `{"from": ..., "value": ...}` | system, human, gpt (user, assistant too) |
| ColossalChat (newer) | `{"from": ..., "content": ...}` | user, assistant (system too) |

A conversation is read strictly: a system turn only first, then user and assistant turns alternating,
starting with the user; a turn of another role, a missing or non-string content, an empty content or
an empty conversation is an error naming the turn (`ChatError`, turned into a `DataError` with the
file and row by the loader). Nothing is reordered, merged or stripped.

The SFT loss mask renders the conversation incrementally: for each assistant turn k, the text before
it (turns < k with the generation prompt) and the text through it (turns <= k) must each be a prefix
of the whole conversation's text; the characters in between are the turn (its content and the
template's end-of-turn marker) and are trained on. A template that re-renders earlier turns (drops
earlier thinking blocks, changes a default system prompt once one is given) fails that check; such a
conversation is trained on its last assistant turn only, and the caller counts and reports it
(`Rendered.fallback`), so a mask is never silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
Message = dict[str, str]


class ChatError(ValueError):
    """A conversation that cannot be read exactly; `turn` is its 0-based index (None: the whole value)."""

    def __init__(self, message: str, turn: int | None = None):
        self.message, self.turn = message, turn
        super().__init__(message if turn is None else f"turn {turn}: {message}")


def read_turn(turn: Any, k: int) -> Message:
    """One turn in any supported format -> {"role", "content"}."""
    if not isinstance(turn, dict):
        raise ChatError(f"expected an object with role and content, got {type(turn).__name__}", k)
    # a Parquet struct column holds every format's fields, None where a turn lacks one
    role_key = next((key for key in ("role", "from") if turn.get(key) is not None), None)
    content_key = next((key for key in ("content", "value") if turn.get(key) is not None), None)
    if role_key is None or content_key is None:
        raise ChatError(f"expected 'role'/'from' and 'content'/'value' fields, got {sorted(turn)}", k)
    role = turn[role_key]
    if not isinstance(role, str) or role not in ROLE_ALIASES:
        raise ChatError(f"unknown role {role!r}; expected one of system, user, assistant (ShareGPT: system, human, "
                        "gpt)", k)
    content = turn[content_key]
    if not isinstance(content, str):
        raise ChatError(f"content must be text, got {type(content).__name__}", k)
    if not content.strip():
        raise ChatError("empty content", k)
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatError("content is not valid Unicode: a lone surrogate", k) from None
    return {"role": ROLE_ALIASES[role], "content": content}


def read_messages(value: Any, need_assistant: bool = False, last: str | None = None) -> list[Message]:
    """A list of turns, checked for order. `need_assistant`: at least one assistant turn and the last turn
    is one (SFT). `last`: the role the last turn must have ("user": a prompt to answer)."""
    if not isinstance(value, list):
        raise ChatError(f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise ChatError("the conversation is empty")
    msgs = [read_turn(t, k) for k, t in enumerate(value)]
    expected = "user"
    for k, m in enumerate(msgs):
        if m["role"] == "system":
            if k:
                raise ChatError("a system turn is only allowed first", k)
            continue
        if m["role"] != expected:
            raise ChatError(f"expected a {expected} turn (user and assistant turns alternate, starting with the "
                            f"user), got {m['role']}", k)
        expected = "assistant" if expected == "user" else "user"
    if need_assistant:
        if not any(m["role"] == "assistant" for m in msgs):
            raise ChatError("no assistant turn: nothing to train on")
        if msgs[-1]["role"] != "assistant":
            raise ChatError("the conversation ends with a user turn that no assistant turn answers", len(msgs) - 1)
    if last is not None and msgs[-1]["role"] != last:
        raise ChatError(f"the last turn must be a {last} turn (the one to answer), got {msgs[-1]['role']}",
                        len(msgs) - 1)
    return msgs


def read_prompt(value: Any) -> str | list[Message]:
    """A prompt: text, or messages ending with a user turn (a multi-turn context to continue)."""
    if isinstance(value, str):
        return value
    return read_messages(value, last="user")


def read_response(value: Any) -> str:
    """A response: text, or a list holding exactly one assistant message (as TRL writes it)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ChatError(f"expected text or a list with one assistant message, got {type(value).__name__}")
    if len(value) != 1:
        raise ChatError(f"expected exactly one assistant message, got {len(value)} turns")
    m = read_turn(value[0], 0)
    if m["role"] != "assistant":
        raise ChatError(f"expected an assistant message, got {m['role']}", 0)
    return m["content"]


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[list[Message], str, str]:
    """TRL's implicit-prompt pairs: `chosen` and `rejected` are whole conversations that share every turn
    but the last, an assistant turn each. -> (shared prompt, chosen answer, rejected answer)."""
    c = read_messages(chosen, need_assistant=True)
    r = read_messages(rejected, need_assistant=True)
    if len(c) != len(r) or c[:-1] != r[:-1]:
        raise ChatError("chosen and rejected must share every turn but their last (assistant) one")
    if len(c) < 2:
        raise ChatError("no prompt: the conversations hold only the assistant turn")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def as_messages(prompt: str | list[Message]) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def last_user_text(prompt: str | list[Message]) -> str:
    """The text a reward function grades the answer against: the prompt, or its last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans of `text` to train on
    fallback: bool = False  # the template re-renders earlier turns: only the last assistant turn is trained on


def render_messages(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_for_training(tokenizer, messages: list[Message], train_on: str = "all") -> Rendered:
    """The whole conversation's text and the spans of its assistant turns (`train_on`: all / last)."""
    full = render_messages(tokenizer, messages)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans, ok = [], True
    for k in turns:
        head = render_messages(tokenizer, messages[:k], add_generation_prompt=True)
        through = full if k == len(messages) - 1 else render_messages(tokenizer, messages[:k + 1])
        if not (through.startswith(head) and full.startswith(through)):
            ok = False
            break
        spans.append((len(head), len(through)))
    if ok:
        return Rendered(full, spans)
    # Re-rendered history: train the last turn on the text the generation prompt implies, which is what
    # the model sees when it answers (the same fallback single-turn rendering uses).
    head = render_messages(tokenizer, messages[:-1], add_generation_prompt=True)
    if full.startswith(head):
        return Rendered(full, [(len(head), len(full))], fallback=True)
    answer = messages[-1]["content"] + (tokenizer.eos_token or "")
    return Rendered(head + answer, [(len(head), len(head) + len(answer))], fallback=True)
