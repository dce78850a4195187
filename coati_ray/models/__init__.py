"""Model loading, presets, RLHF heads (log-probs, values) and LoRA."""
