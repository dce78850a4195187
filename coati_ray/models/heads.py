"""Forward passes that return what RLHF needs: per-token log-probs (actor) and values (critic/RM).

All call the (possibly DDP/FSDP/peft-wrapped) model itself, so distributed gradient hooks fire.
Rollouts are left-padded, so every forward passes position ids counted from the first real
token, as `generate()` does; otherwise a trainer would score a sequence at other positions than
the generator sampled it (llama's forward numbers positions from column 0 when given none).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from torch import nn

from coati_ray.algos.logprobs import log_probs_from_logits


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... from each row's first attended token (left padding gets 0). (B, T) -> (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _takes_position_ids(model: nn.Module) -> bool:
    """Whether the HF model inside any wrappers accepts `position_ids` (bloom uses ALiBi instead)."""
    cached = getattr(model, "_coati_takes_pos", None)
    if cached is None:
        from transformers import PreTrainedModel

        inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
        cached = inner is not None and "position_ids" in inspect.signature(inner.forward).parameters
        model._coati_takes_pos = cached
    return cached


def set_packing(model: nn.Module, on: bool) -> None:
    """Let `forward` pack this model's padded batches (coati_ray/data/packing.py) where the model
    takes it; the PPO roles call it with --packing."""
    from coati_ray.data.packing import model_can_pack

    model._coati_pack = on and model_can_pack(model)


def forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            positions: torch.Tensor | None = None):
    """model(...) with position ids that respect left padding (or `positions`, for a packed batch
    whose attention_mask is 4-D: coati_ray/data/packing.py).

    A model marked by `set_packing` runs a padded batch packed when that saves positions: the
    result then has `.logits` laid out as the padded batch (zeros at its padding) and `.unpack`,
    which does the same for any other per-position output (the critic's values).
    """
    if positions is not None:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    if getattr(model, "_coati_pack", False):
        from coati_ray.data.packing import pack_padded

        packed = pack_padded(input_ids, attention_mask)
        if packed is not None:
            b = packed.batch
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
            logits = out.logits if out.logits.dim() == 3 else None  # a classifier's pooled logits mean nothing here
            return SimpleNamespace(logits=None if logits is None else packed.unpack(logits), unpack=packed.unpack)
    kw = {"position_ids": position_ids(attention_mask)} if _takes_position_ids(model) else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, **kw)


def action_log_probs(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                     num_actions: int | None = None, temperature: float = 1.0,
                     return_logits: bool = False):
    """log p(token_t | tokens_<t) for the last `num_actions` tokens of each sequence.

    p is softmax(logits / temperature): the distribution the generator samples from.
    sequences, attention_mask: (B, T) -> (B, num_actions) (or (B, T-1) when num_actions is None);
    with return_logits also the matching (B, num_actions, V) scaled logits (for the entropy).
    """
    logits = forward(model, sequences, attention_mask).logits  # (B, T, V)
    start = 0 if num_actions is None else sequences.shape[1] - 1 - num_actions
    logits = logits[:, start:-1]  # (B, A, V): position t predicts token t + 1
    if temperature != 1.0:
        logits = logits / temperature
    lp = log_probs_from_logits(logits, sequences[:, start + 1:])  # (B, A)
    return (lp, logits) if return_logits else lp


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


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar head applied at every position: (B, T) -> (B, T).

    HF sequence-classification models pool inside forward(); a hook on the head keeps the
    per-token output, which the critic needs and from which the reward is read.
    """
    captured: list[torch.Tensor] = []
    handle = _score_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        out = forward(model, input_ids, attention_mask, positions)
    finally:
        handle.remove()
    values = captured[-1]
    if isinstance(out, SimpleNamespace):  # ran packed: back to the padded layout
        values = out.unpack(values)
    return values.squeeze(-1).float()  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position per row, for left or right padding: (B, T) -> (B,)"""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(dim=1)


def sequence_reward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each whole sequence: the head's output at its last token. (B, T) -> (B,)"""
    values = token_values(model, input_ids, attention_mask)  # (B, T)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)
