"""The embedded defaults: demo data, the project's tokenizer and tiny models, made on first use.

Everything lives under one cache directory (`$COATI_RAY_CACHE`, else `~/.cache/coati_ray`) and is
written to a temporary directory first and renamed into place, so concurrent callers (several
trainer actors, parallel tests) never see half-written files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

DEMO_SEED = 42
# Bump when the demo generator, tokenizer training or presets change: assets are rebuilt under a
# new directory instead of silently mixing old data with a new tokenizer.
ASSETS_VERSION = 3


def cache_dir() -> Path:
    root = Path(os.environ.get("COATI_RAY_CACHE", Path.home() / ".cache" / "coati_ray")).expanduser()
    return root / f"v{ASSETS_VERSION}"


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmpdir)` and rename tmpdir to `target`, unless `target` already exists."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_data_dir() -> Path:
    from coati_ray.data.demo import write_demo_data

    return _build_once(cache_dir() / "demo_data", lambda d: write_demo_data(d, seed=DEMO_SEED))


def demo_file(name: str) -> str:
    """Path of one demo file, e.g. demo_file('sft_train.json')."""
    return str(demo_data_dir() / name)


def tokenizer_dir() -> Path:
    def build(d: Path) -> None:
        from coati_ray.data.demo import corpus
        from coati_ray.data.tokenizer import train_tokenizer

        train_tokenizer(corpus(demo_data_dir())).save_pretrained(str(d))

    return _build_once(cache_dir() / "tokenizer", build)


def default_model_dir(family: str = "llama", size: str = "tiny") -> Path:
    """An HF directory with a randomly initialised (seeded) tiny model of `family` + tokenizer."""

    def build(d: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from coati_ray.presets import preset_config

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
        cfg = preset_config(family, size, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        torch.manual_seed(DEMO_SEED)
        model = AutoModelForCausalLM.from_config(cfg)
        model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                   pad_token_id=tok.pad_token_id)
        model.save_pretrained(str(d))
        tok.save_pretrained(str(d))
        logger.info("built default %s-%s model (%.2fM parameters) at %s", family, size,
                    sum(p.numel() for p in model.parameters()) / 1e6, d)

    return _build_once(cache_dir() / "models" / f"{family}-{size}", build)
