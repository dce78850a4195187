"""Turn validated rows into token ids: chat template, response-only loss mask, truncation.

A tokenizer with a chat template renders `[user, assistant]`; one without (e.g. GPT-2) falls
back to the Alpaca-style prompt that ColossalChat's SFT used. In both, the prompt rendered on its
own is a prefix of the full text, which is how the loss mask finds the response tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


def instruction_prompt(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text a model sees before it answers `prompt` (ends where the response starts)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return (tokenizer.bos_token or "") + ALPACA_PROMPT.format(prompt=prompt)


def render_chat(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, full text) with full = prompt text + response + end of turn."""
    head = render_prompt(tokenizer, prompt)
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
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


def tokenize_sft(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_len: int) -> TokenizedSFT | None:
    """Token ids with labels only on the response; None when truncation leaves no response token."""
    head, full = render_chat(tokenizer, prompt, response)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(head_ids)
    if ids[:n_prompt] != head_ids:  # BPE merged across the boundary; find the longest common prefix
        n_prompt = next((i for i, (a, b) in enumerate(zip(ids, head_ids)) if a != b), min(len(ids), n_prompt))
    ids = ids[:max_len]
    labels = [IGNORE_INDEX] * min(n_prompt, len(ids)) + ids[n_prompt:]
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


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, chosen: str, rejected: str,
                  max_len: int) -> TokenizedPair:
    _, c = render_chat(tokenizer, prompt, chosen)
    _, r = render_chat(tokenizer, prompt, rejected)
    return TokenizedPair(tokenize_text(tokenizer, c, max_len), tokenize_text(tokenizer, r, max_len))


def collate_pairs(items: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    seqs = [x.chosen for x in items] + [x.rejected for x in items]  # chosen first, then rejected
    return {"input_ids": pad_batch(seqs, pad_id),  # (2B, T)
            "attention_mask": pad_batch([[1] * len(s) for s in seqs], 0)}
