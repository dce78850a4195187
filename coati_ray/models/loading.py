"""Load models and tokenizers by path, with errors that say what was wrong.

`--pretrain` takes any local HF directory (a causal LM, a sequence-classification reward model,
or a peft adapter directory whose base is reachable); with no `--pretrain` the embedded tiny
preset of the `--model` family is built and used. `--model` is one of the seed's family names
(llama, gpt2, opt, bloom) or `auto`; a family that does not match the checkpoint is an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from coati_ray.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ModelFamily = Literal["auto", "llama", "gpt2", "opt", "bloom"]
MODEL_FAMILIES = ("auto", "llama", "gpt2", "opt", "bloom")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # flag -> torch dtype name


def _dtype_kw(dtype: str) -> dict:
    """transformers renamed `torch_dtype` to `dtype` in 4.56; we support 4.51 (colossalai) and 5.x."""
    import torch
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: getattr(torch, DTYPES[dtype])}


def resolve_model_path(pretrain: str | None, model: str = "auto", size: str = "tiny") -> str:
    """The directory to load: `pretrain`, or the embedded preset of `model` when it is None."""
    if model not in MODEL_FAMILIES:
        raise ConfigError("model", f"unknown model family {model!r}; expected one of {', '.join(MODEL_FAMILIES)}")
    if pretrain:
        return _check_path(pretrain)
    from coati_ray.defaults import default_model_dir

    return str(default_model_dir("llama" if model == "auto" else model, size))


def _check_path(pretrain: str) -> str:
    path = Path(pretrain).expanduser()
    if path.is_dir():
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise ModelLoadError(f"--pretrain {pretrain}: the directory has no config.json (nor adapter_config.json); "
                                 "expected a Hugging Face model directory saved with save_pretrained")
        return str(path)
    if path.exists():
        raise ModelLoadError(f"--pretrain {pretrain}: is a file; expected a Hugging Face model directory")
    if pretrain.startswith(("/", "./", "../", "~")) or pretrain.count("/") != 1:
        raise ModelLoadError(f"--pretrain {pretrain}: no such directory; expected a local Hugging Face model "
                             "directory (or a hub id 'org/name' where the hub is reachable)")
    return pretrain  # a hub id: from_pretrained will try it and we wrap its error


def _adapter_base(path: str) -> str | None:
    cfg = Path(path) / "adapter_config.json"
    if cfg.exists():
        return json.loads(cfg.read_text())["base_model_name_or_path"]
    return None


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        base = _adapter_base(path) if Path(path).is_dir() else None
        if base is None:
            raise ModelLoadError(f"could not load a tokenizer from {path}: {e}") from e
        tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:  # llama/gpt2 ship without one; pad with EOS, masked by attention_mask
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def check_family(config, model: str, path: str) -> None:
    """`config`: a loaded config, or what `model_type()` read."""
    found = config if isinstance(config, str) or config is None else config.model_type
    if model != "auto" and found is not None and found != model:
        raise ConfigError("model", f"{path} holds a '{found}' model, not '{model}'; "
                          f"pass --model {found} or --model auto")


def model_type(path: str) -> str | None:
    """The `model_type` a model directory's config.json names (an adapter directory: its base's), read
    without importing transformers or torch: the driver checks paths this way before its Ray starts.
    None for an adapter whose base is a hub id (what it holds is known once the actors load it)."""
    base = _adapter_base(path) if Path(path).is_dir() else None
    if base is not None and not Path(base).is_dir():
        return None
    config = Path(base or path) / "config.json"
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"could not read a model config from {config}: {e}") from e
    if not isinstance(found, str) or not found:
        raise ModelLoadError(f"{config} names no model_type: not a Hugging Face model config")
    return found


def load_config(path: str):
    from transformers import AutoConfig

    base = _adapter_base(path) if Path(path).is_dir() else None
    try:
        return AutoConfig.from_pretrained(base or path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read a model config from {base or path}: {e}") from e


def load_causal_lm(path: str, model: str = "auto", dtype: str = "fp32") -> PreTrainedModel:
    """A causal LM from `path` (an adapter directory loads its base and then the adapter)."""
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    check_family(config, model, path)
    base = _adapter_base(path) if Path(path).is_dir() else None
    try:
        lm = AutoModelForCausalLM.from_pretrained(base or path, **_dtype_kw(dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a causal LM from {base or path}: {e}") from e
    if base:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, path, is_trainable=True)
    return lm


def load_value_model(path: str, model: str = "auto", dtype: str = "fp32",
                     pad_token_id: int | None = None) -> PreTrainedModel:
    """An LM backbone + scalar head (`AutoModelForSequenceClassification`, num_labels=1).

    From a causal-LM directory the head is new (initialised from the current torch seed); from a
    saved reward/critic directory it is loaded.
    """
    from transformers import AutoModelForSequenceClassification

    config = load_config(path)
    check_family(config, model, path)
    try:
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **_dtype_kw(dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a reward/critic model from {path}: {e}") from e
    if m.config.pad_token_id is None:
        m.config.pad_token_id = pad_token_id if pad_token_id is not None else config.eos_token_id
    return m

