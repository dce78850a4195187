"""Padding-free packing: a micro-batch's sequences laid end to end in a few rows instead of padded
to the longest one.

A padded micro-batch of B sequences costs B x max(len) positions; one long dialogue among short
instructions makes most of them padding (on the demo data 78% of SFT batches hold one). Packed,
the same sequences fill rows of at most `row_tokens` positions; each sequence keeps its own
positions (0, 1, ... from its first token) and a block-diagonal causal mask keeps it from
attending to its neighbours, so every token's logits are those of the sequence alone (float
noise aside; tests/unit/test_packing.py checks SFT and RM losses against the padded batch).

Only model types whose attention takes a 4-D mask and positions as given are packed
(`PACKABLE`: RoPE models built on transformers' shared masking), and only with transformers >= 5
and SDPA attention, where a boolean 4-D mask is passed to torch's SDPA as it is (4.x turns masks
into float ones on CUDA and refuses a boolean one; eager attention adds the mask); other models
(gpt2, opt, bloom, flash-attention) keep padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coati_ray.data.formatting import IGNORE_INDEX

# model_type values whose forward honours position_ids and a 4-D boolean attention mask
PACKABLE = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})


def can_pack(model_type: str | None) -> bool:
    return model_type in PACKABLE


def model_can_pack(model: torch.nn.Module) -> bool:
    """Whether this loaded model (through any wrappers) takes a packed batch: see the module doc."""
    import transformers
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None or int(transformers.__version__.split(".")[0]) < 5:
        return False
    return can_pack(inner.config.model_type) and getattr(inner.config, "_attn_implementation", None) == "sdpa"


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Which sequences share a row: as few rows as first-fit (longest first) needs with rows of at
    most `row_tokens` positions, then the narrowest width at which first-fit still needs no more
    rows, so that the rows come out even and little of them is tail padding (a sequence longer
    than `row_tokens` gets a row of its own). Returns the indices of each row's sequences in the
    order they are laid out."""
    rows = _first_fit(lengths, row_tokens)
    if len(rows) < 2:
        return rows
    lo = max(max(lengths), -(-sum(lengths) // len(rows)))  # no width below this can hold them in len(rows)
    hi = max(sum(lengths[i] for i in r) for r in rows)
    while lo < hi:  # first-fit's row count is not monotone in the width, but near-enough: bisect
        mid = (lo + hi) // 2
        if len(_first_fit(lengths, mid)) <= len(rows):
            hi = mid
        else:
            lo = mid + 1
    even = _first_fit(lengths, hi)
    return even if len(even) <= len(rows) else rows


def _first_fit(lengths: list[int], row_tokens: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return rows


@dataclass
class PaddingStats:
    real: int  # tokens of the sequences
    padded: int  # positions a padded batch computes
    packed: int  # positions the packed batch computes

    def share(self, positions: int) -> float:
        return 1.0 - self.real / max(positions, 1)


def padding_stats(lengths: list[int], row_tokens: int) -> PaddingStats:
    rows = pack_rows(lengths, row_tokens)
    width = max(sum(lengths[i] for i in r) for r in rows) if rows else 0
    return PaddingStats(sum(lengths), len(lengths) * max(lengths, default=0), len(rows) * width)


def pack(seqs: list[list[int]], pad_id: int, row_tokens: int,
         labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Pack `seqs` (token ids) into rows of at most `row_tokens` positions.

    Returns
      input_ids      (R, L)        rows, each padded at its end with `pad_id`
      position_ids   (R, L)        0, 1, ... from each sequence's first token (the tail pad too)
      attention_mask (R, 1, L, L)  bool, True where query i may attend key j: causal, same sequence
      tokens_mask    (R, L)        1 at the sequences' tokens, 0 at the tail pad
      seq_row, seq_end (N,)        row and last position of sequence n, in the order of `seqs`
      labels         (R, L)        when `labels` is given: the labels, IGNORE_INDEX at the pad and
                                   at each sequence's first token (nothing predicts it from the
                                   previous sequence's last)
    """
    lengths = [len(s) for s in seqs]
    rows = pack_rows(lengths, row_tokens)
    L = max(sum(lengths[i] for i in r) for r in rows)
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    segment = torch.full((R, L), -1, dtype=torch.long)  # which sequence a position holds; -1: the tail pad
    tokens_mask = torch.zeros((R, L), dtype=torch.long)
    out_labels = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    seq_row = torch.zeros(len(seqs), dtype=torch.long)
    seq_end = torch.zeros(len(seqs), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            input_ids[r, at:at + n] = torch.tensor(seqs[i], dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = i
            tokens_mask[r, at:at + n] = 1
            if labels is not None:
                out_labels[r, at:at + n] = torch.tensor(labels[i], dtype=torch.long)
                out_labels[r, at] = IGNORE_INDEX
            seq_row[i], seq_end[i] = r, at + n - 1
            at += n
        position_ids[r, at:] = torch.arange(L - at)  # the pad is a sequence of its own
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)  # (R, L, L); pad attends to pad only
    batch = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": (same & causal).unsqueeze(1),
             "tokens_mask": tokens_mask, "seq_row": seq_row, "seq_end": seq_end}
    if labels is not None:
        batch["labels"] = out_labels
    return batch


@dataclass
class PackedPadded:
    """A padded (B, T) batch packed for one forward pass, and the way back (`unpack`)."""

    batch: dict[str, torch.Tensor]  # input_ids, position_ids, attention_mask (4-D), ... as `pack` returns
    src: torch.Tensor  # (N,) flat packed positions of the real tokens
    dst: torch.Tensor  # (N,) the same tokens' flat positions in the padded batch
    shape: tuple[int, int]  # (B, T)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(R, L, ...) per packed position -> (B, T, ...) per padded position (zeros at the padding);
        differentiable."""
        B, T = self.shape
        flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
        out = flat.new_zeros((B * T, *x.shape[2:]))
        return out.index_copy(0, self.dst, flat.index_select(0, self.src)).view(B, T, *x.shape[2:])


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                min_saving: float = 0.1) -> PackedPadded | None:
    """Pack a padded batch (any mix of left and right padding: a row's attended tokens are its
    sequence) into rows no wider than the batch; None when that saves less than `min_saving` of
    the positions (then the padded forward is as good)."""
    B, T = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(1).tolist()
    rows = pack_rows(lengths, T)
    width = max(sum(lengths[i] for i in r) for r in rows)
    if len(rows) * width > (1 - min_saving) * B * T:
        return None
    ids = input_ids.cpu()
    batch = pack([ids[b][mask[b].cpu()].tolist() for b in range(B)], 0, T)
    L = batch["input_ids"].shape[1]
    src = torch.cat([batch["seq_row"][b] * L + torch.arange(batch["seq_end"][b] - n + 1, batch["seq_end"][b] + 1)
                     for b, n in enumerate(lengths)])
    dst = torch.cat([b * T + mask[b].nonzero().squeeze(1).cpu() for b in range(B)])
    device = input_ids.device
    return PackedPadded({k: v.to(device) for k, v in batch.items()}, src.to(device), dst.to(device), (B, T))
