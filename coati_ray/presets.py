"""Tiny models built from a config, one per model family the seed names.

`tiny` (~4M parameters with the demo tokenizer) is the embedded default; `micro` (~0.3M) keeps
tests fast. They are saved once in HF format (`defaults.default_model_dir`) and then loaded by path
like any HF model. A ground-floor module (it imports nothing from coati_ray), so that `defaults`,
which builds them, does not import `models`, which loads the default model through `defaults`.
"""

from __future__ import annotations

from transformers import PretrainedConfig

SIZES = {
    # hidden, layers, heads, ffn
    "tiny": (256, 4, 4, 688),
    "micro": (64, 2, 2, 176),
    # not a --preset_size: the larger variant of scripts/bench_peer.py (~52M parameters, issue 18)
    "small": (512, 16, 8, 1376),
}
FAMILIES = ("llama", "gpt2", "opt", "bloom")


def preset_config(family: str, size: str, vocab_size: int, bos: int, eos: int, pad: int,
                  max_positions: int = 512) -> PretrainedConfig:
    if size not in SIZES:
        raise ValueError(f"unknown preset size {size!r}; expected one of {sorted(SIZES)}")
    h, layers, heads, ffn = SIZES[size]
    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn,
                           max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    if family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab_size, n_embd=h, n_layer=layers, n_head=heads, n_inner=ffn,
                          n_positions=max_positions, **ids)
    if family == "opt":
        from transformers import OPTConfig

        return OPTConfig(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=layers, ffn_dim=ffn,
                         num_attention_heads=heads, word_embed_proj_dim=h,
                         max_position_embeddings=max_positions, **ids)
    if family == "bloom":
        from transformers import BloomConfig

        return BloomConfig(vocab_size=vocab_size, hidden_size=h, n_layer=layers, n_head=heads, **ids)
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
