"""Reference actor: the frozen initial policy; per-token log-probs for the KL penalty."""

from __future__ import annotations

import torch

from coati_ray.experience import Experience


class ReferenceWorker:
    def __init__(self, model_path: str, family: str = "auto", dtype: str = "fp32", num_threads: int = 1,
                 packing: bool = False):
        from coati_ray.models.loading import load_causal_lm
        from coati_ray.runtime import quiet_libraries

        quiet_libraries()
        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = load_causal_lm(model_path, family, dtype).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        from coati_ray.models.heads import set_packing

        set_packing(self.model, packing)  # --packing: padded rollouts run packed (models/heads.py)

    @torch.no_grad()
    def log_probs(self, exp: Experience, temperature: float = 1.0, micro_batch: int = 64) -> torch.Tensor:
        """(B, A) log-probs of the response tokens under the reference (same temperature as sampling)."""
        from coati_ray.models.heads import action_log_probs

        out = [action_log_probs(self.model, e.sequences.to(self.device), e.attention_mask.to(self.device),
                                e.num_actions, temperature).cpu() for e in exp.split(micro_batch)]
        return torch.cat(out)

    def node_id(self) -> str:
        from coati_ray.runtime import current_node_id

        return current_node_id()
