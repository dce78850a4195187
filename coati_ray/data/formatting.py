"""Turn validated rows into token ids: chat template, response-only loss mask, truncation.

A tokenizer with a chat template renders `[user, assistant]` (or a whole conversation, see
`conversations.render_for_training`); one without (e.g. GPT-2) falls back to the Alpaca-style
prompt that ColossalChat's SFT used, for single-turn rows only. In both, the prompt rendered on its
own is a prefix of the full text, which is how the loss mask finds the response tokens
(`tokenize_spans`: character spans to token positions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from coati_ray.data.conversations import ChatError, Message, as_messages, render_for_training

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


def instruction_prompt(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message]) -> str:
    """The text a model sees before it answers `prompt` (ends where the response starts)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + ALPACA_PROMPT.format(prompt=_single_turn(prompt))


def _single_turn(prompt: str | list[Message]) -> str:
    """The Alpaca fallback (no chat template) has one user turn and no system prompt."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise ChatError(f"a conversation of {len(prompt)} turns before the answer needs a tokenizer with a chat "
                        "template (this one has none; set tokenizer.chat_template or pass single-turn rows)")
    return prompt[0]["content"]


def render_chat(tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message], response: str) -> tuple[str, str]:
    """(prompt text, full text) with full = prompt text + response + end of turn."""
    head = render_prompt(tokenizer, prompt)
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template(
            as_messages(prompt) + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            # Some templates re-render earlier turns (e.g. strip thinking blocks); then we cannot
            # mask by prefix, so use the plain concatenation that the generation prompt implies.
            full = head + response + (tokenizer.eos_token or "")
    else:
        full = head + response + (tokenizer.eos_token or "")
    return head, full


@dataclass
class TokenizedSFT:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens and padding


def tokenize_sft(tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message], response: str,
                 max_len: int) -> TokenizedSFT | None:
    """Token ids with labels only on the response; None when truncation leaves no response token."""
    head, full = render_chat(tokenizer, prompt, response)
    return tokenize_spans(tokenizer, full, [(len(head), len(full))], max_len)


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_len: int,
                          train_on: str = "all") -> tuple[TokenizedSFT | None, bool]:
    """(ids with labels on the assistant turns, whether the template forced the last-turn fallback)."""
    if not tokenizer.chat_template:
        head = render_prompt(tokenizer, messages[:-1])  # one user turn, or ChatError
        full = head + messages[-1]["content"] + (tokenizer.eos_token or "")
        return tokenize_spans(tokenizer, full, [(len(head), len(full))], max_len), False
    r = render_for_training(tokenizer, messages, train_on)
    return tokenize_spans(tokenizer, r.text, r.spans, max_len), r.fallback


def tokenize_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]],
                   max_len: int) -> TokenizedSFT | None:
    """Ids of `text`, labels on the tokens inside the character `spans`; None when truncation leaves none.

    A span boundary at character c falls after the tokens of `text[:c]` (the longest common prefix of
    the two token lists when BPE merges across the boundary)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def boundary(c: int) -> int:
        if c >= len(text):
            return len(ids)
        pre = tokenizer(text[:c], add_special_tokens=False)["input_ids"]
        if ids[:len(pre)] == pre:
            return len(pre)
        return next((i for i, (a, b) in enumerate(zip(ids, pre)) if a != b), min(len(ids), len(pre)))

    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        s, e = boundary(a), boundary(b)
        labels[s:e] = ids[s:e]
    ids, labels = ids[:max_len], labels[:max_len]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return TokenizedSFT(ids, labels)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_len]


def pad_batch(seqs: list[list[int]], pad_value: int) -> torch.Tensor:
    """Right-pad lists of ids into a (B, T) LongTensor."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate_sft(items: list[TokenizedSFT], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids = pad_batch([x.input_ids for x in items], pad_id)  # (B, T)
    labels = pad_batch([x.labels for x in items], IGNORE_INDEX)  # (B, T)
    attention_mask = pad_batch([[1] * len(x.input_ids) for x in items], 0)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class TokenizedPair:
    chosen: list[int]
    rejected: list[int]


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message], chosen: str, rejected: str,
                  max_len: int) -> TokenizedPair:
    _, c = render_chat(tokenizer, prompt, chosen)
    _, r = render_chat(tokenizer, prompt, rejected)
    return TokenizedPair(tokenize_text(tokenizer, c, max_len), tokenize_text(tokenizer, r, max_len))


def collate_pairs(items: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    seqs = [x.chosen for x in items] + [x.rejected for x in items]  # chosen first, then rejected
    return {"input_ids": pad_batch(seqs, pad_id),  # (2B, T)
            "attention_mask": pad_batch([[1] * len(s) for s in seqs], 0)}
