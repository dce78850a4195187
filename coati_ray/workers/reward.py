"""Reward actor: a reward model (LM + scalar head) scoring whole sequences."""

from __future__ import annotations

import torch

from coati_ray.experience import Experience


class RewardWorker:
    def __init__(self, model_path: str, family: str = "auto", dtype: str = "fp32", num_threads: int = 1):
        from coati_ray.models.loading import load_tokenizer, load_value_model
        from coati_ray.runtime import quiet_libraries

        quiet_libraries()
        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        tok = load_tokenizer(model_path)
        self.model = load_value_model(model_path, family, dtype, pad_token_id=tok.pad_token_id).to(self.device).eval()

    @torch.no_grad()
    def score(self, exp: Experience, micro_batch: int = 64) -> torch.Tensor:
        """(B,) the head's output at each sequence's last token (EOS when the response finished)."""
        from coati_ray.models.heads import sequence_reward

        out = [sequence_reward(self.model, e.sequences.to(self.device), e.attention_mask.to(self.device)).cpu()
               for e in exp.split(micro_batch)]
        return torch.cat(out)

    def node_id(self) -> str:
        from coati_ray.runtime import current_node_id

        return current_node_id()
