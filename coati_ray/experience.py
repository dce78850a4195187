"""The one experience type: a batch of rollouts and everything PPO derives from them.

Layout of a row: `[left padding | prompt | response | right padding]`. The prompt part is P
tokens (left-padded), the response part A tokens (right-padded), T = P + A. Per-token RL
quantities are (B, A): position a is the a-th response token, predicted from position P + a - 1.
Samples of one prompt are consecutive rows (n_samples_per_prompt of them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# Fields that are (B, A) and right-padded with zeros when batches of different A are joined.
_ACTION_FIELDS = ("action_mask", "log_probs", "ref_log_probs", "kl", "values", "advantages", "returns")


@dataclass
class Experience:
    sequences: torch.Tensor  # (B, T) long: left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # (B, T) long: 1 on prompt and response tokens (EOS included)
    action_mask: torch.Tensor  # (B, A) float: 1 on response tokens
    log_probs: torch.Tensor  # (B, A) behaviour log-probs: of the distribution each token was sampled from
    score: torch.Tensor  # (B,) reward-model score of the whole sequence (after normalise/clip)
    sample_ids: torch.Tensor  # (B,) long: unique per sample, for counting loss and duplication
    versions: torch.Tensor  # (B,) long: policy weight version that generated the sample
    prompt_index: torch.Tensor  # (B,) long: row of the prompt in the prompt dataset
    ref_log_probs: torch.Tensor | None = None  # (B, A)
    kl: torch.Tensor | None = None  # (B, A) per-token KL estimate (policy vs reference)
    values: torch.Tensor | None = None  # (B, A) critic values V(s_t) before each response token
    advantages: torch.Tensor | None = None  # (B, A)
    returns: torch.Tensor | None = None  # (B, A)
    raw_score: torch.Tensor | None = None  # (B,) score before normalise/clip (for metrics)

    @property
    def size(self) -> int:
        return self.sequences.shape[0]

    @property
    def num_actions(self) -> int:
        return self.action_mask.shape[1]

    def to(self, device: torch.device | str) -> Experience:
        return replace(self, **{f.name: v.to(device) for f in fields(self)
                                if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def select(self, index: torch.Tensor | list[int]) -> Experience:
        """Rows `index` (any order), as a new Experience with the same P and A."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return replace(self, **{f.name: v[idx] for f in fields(self)
                                if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def split(self, size: int) -> list[Experience]:
        return [self.select(list(range(i, min(i + size, self.size)))) for i in range(0, self.size, size)]

    @staticmethod
    def concat(parts: list[Experience], pad_token_id: int) -> Experience:
        """Join batches whose prompt (P) and response (A) widths may differ, re-padding both parts."""
        if len(parts) == 1:
            return parts[0]
        P = max(e.sequences.shape[1] - e.num_actions for e in parts)
        A = max(e.num_actions for e in parts)
        out: dict[str, torch.Tensor | None] = {}
        for f in fields(Experience):
            vals = [getattr(e, f.name) for e in parts]
            if any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"cannot join experience with and without {f.name}")
                out[f.name] = None
            elif f.name in ("sequences", "attention_mask"):
                pad = pad_token_id if f.name == "sequences" else 0
                out[f.name] = torch.cat([_repad(v, v.shape[1] - e.num_actions, P, A, pad)
                                         for v, e in zip(vals, parts)])
            elif f.name in _ACTION_FIELDS:
                out[f.name] = torch.cat([torch.nn.functional.pad(v, (0, A - v.shape[1])) for v in vals])
            else:
                out[f.name] = torch.cat(vals)
        return Experience(**out)


def _repad(x: torch.Tensor, p: int, P: int, A: int, pad: int) -> torch.Tensor:
    """(B, p + a) -> (B, P + A): more left padding on the prompt, more right padding on the response."""
    a = x.shape[1] - p
    return torch.nn.functional.pad(x, (P - p, A - a), value=pad)
