"""Reward actor: holds the run's reward sources (a reward model, a Python function or verifier, a
reward server; see coati_ray/rewards/) and scores whole sequences with each of them."""

from __future__ import annotations

import torch

from coati_ray.experience import Experience
from coati_ray.rewards.functions import RewardBatch
from coati_ray.rewards.sources import RemoteOptions, RewardSpec


class RewardWorker:
    def __init__(self, specs: list[RewardSpec], family: str = "auto", dtype: str = "fp32", num_threads: int = 1,
                 remote: RemoteOptions | None = None, packing: bool = False):
        from coati_ray.rewards.sources import build_source
        from coati_ray.runtime import quiet_libraries

        quiet_libraries()
        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.specs, self.model = specs, None
        rm = next((s for s in specs if s.kind == "rm"), None)
        if rm is not None:
            from coati_ray.models.loading import load_tokenizer, load_value_model

            tok = load_tokenizer(rm.target)
            self.model = load_value_model(rm.target, family, dtype, pad_token_id=tok.pad_token_id).to(
                self.device).eval()
            from coati_ray.models.heads import set_packing

            set_packing(self.model, packing)  # --packing: padded rollouts run packed (models/heads.py)
        self.sources = {s.name: build_source(s, remote or RemoteOptions(), self.model_score) for s in specs}

    @torch.no_grad()
    def model_score(self, exp: Experience, micro_batch: int = 64) -> torch.Tensor:
        """(B,) the reward model head's output at each sequence's last token (EOS when it finished)."""
        from coati_ray.models.heads import sequence_reward

        out = [sequence_reward(self.model, e.sequences.to(self.device), e.attention_mask.to(self.device)).cpu()
               for e in exp.split(micro_batch)]
        return torch.cat(out)

    def score(self, exp: Experience, batch: RewardBatch | None = None) -> dict[str, torch.Tensor]:
        """{source name: (B,) scores}, one entry per reward source, in the order of the specs."""
        return {name: source(batch, exp).float() for name, source in self.sources.items()}

    def node_id(self) -> str:
        from coati_ray.runtime import current_node_id

        return current_node_id()
