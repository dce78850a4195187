"""Forward passes that return what RLHF needs: per-token log-probs (actor) and values (critic/RM).

Both call the (possibly DDP/FSDP/peft-wrapped) model itself, so distributed gradient hooks fire.
"""

from __future__ import annotations

import torch
from torch import nn

from coati_ray.algos.logprobs import log_probs_from_logits


def action_log_probs(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                     num_actions: int | None = None) -> torch.Tensor:
    """log p(token_t | tokens_<t) for the last `num_actions` tokens of each sequence.

    sequences, attention_mask: (B, T) -> (B, num_actions) (or (B, T-1) when num_actions is None).
    """
    logits = model(input_ids=sequences, attention_mask=attention_mask).logits  # (B, T, V)
    lp = log_probs_from_logits(logits[:, :-1], sequences[:, 1:])  # (B, T-1)
    return lp if num_actions is None else lp[:, -num_actions:]


def _score_module(model: nn.Module) -> nn.Module:
    """The scalar head of an HF *ForSequenceClassification model (`score`), through any wrappers."""
    best = None
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last == "score" and (best is None or len(name) < len(best[0])):
            best = (name, module)
    if best is None:
        raise TypeError(f"{type(model).__name__} has no 'score' head; expected an AutoModelForSequenceClassification")
    return best[1]


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head applied at every position: (B, T) -> (B, T).

    HF sequence-classification models pool inside forward(); a hook on the head keeps the
    per-token output, which the critic needs and from which the reward is read.
    """
    captured: list[torch.Tensor] = []
    handle = _score_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured[-1].squeeze(-1).float()  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position per row, for left or right padding: (B, T) -> (B,)"""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(dim=1)


def sequence_reward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each whole sequence: the head's output at its last token. (B, T) -> (B,)"""
    values = token_values(model, input_ids, attention_mask)  # (B, T)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)
