"""LoRA adapters through peft (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

from __future__ import annotations

from torch import nn


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: str,
               task: str) -> nn.Module:
    """Wrap `model` so only LoRA adapters (and, for a value model, the scalar head) train.

    target_modules: "all-linear" or a comma-separated list of module names.
    task: "causal_lm" or "value" (sequence classification: the `score` head stays trainable).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets = "all-linear" if target_modules == "all-linear" else \
        [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS)
    return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)
