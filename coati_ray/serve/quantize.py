"""GPTQ weight-only quantization (4 or 8 bits) of our HF causal LMs, on CPU or GPU, with GPTQModel.

    facts = quantize("outputs/demo/sft", "outputs/demo/sft-gptq4", bits=4)
    model, tokenizer = load_quantized("outputs/demo/sft-gptq4")

`quantize` calibrates on rows of our own data (the demo SFT set unless `calibration_file`), rendered
with the model's chat template exactly as training saw them, and writes a standard GPTQ checkpoint:
`config.json` with a `quantization_config` (quant_method "gptq", bits, group_size), safetensors
weights (int32-packed `qweight`/`qzeros`, fp16 `scales`; embeddings, norms and lm_head stay bf16)
and the tokenizer. Such a directory loads with plain `AutoModelForCausalLM.from_pretrained`
(transformers + optimum + gptqmodel kernels); `load_quantized` also picks a CPU kernel that
handles its shapes.

Group size: a group must divide every quantized layer's input features for the fast CPU/GPU
kernels, so a requested size that does not is lowered to the largest standard size (64, 32) that
does, else quantization is per output channel (group_size -1); the returned facts and a warning
say so. Our tiny presets have such dimensions (ffn 688 and 176); ~100M+ models do not.

Needs the `quant` extra (`pip install 'coati_ray[quant]'`); nothing here imports gptqmodel until
it is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import ClassVar

import torch

from coati_ray.errors import ConfigError, DataError, MissingExtraError, ModelLoadError

logger = logging.getLogger(__name__)

BITS = (4, 8)
STANDARD_GROUP_SIZES = (128, 64, 32)  # what GPTQ kernels (CPU int4pack, Marlin, ExLlama) support
# aten::_weight_int4pack_mm_for_cpu (gptqmodel's default 4-bit CPU kernels) needs in_features
# divisible by a group size from this set; otherwise CPU inference uses the plain torch kernel.
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
PURPOSE = "GPTQ quantization"


# --------------------------------------------------------------------------------------------
# quantize


def quantize(model_path: str, out_path: str, bits: int = 4, group_size: int = 128,
             calibration_file: str | None = None, n_samples: int = 128, max_len: int = 256,
             seed: int = 0) -> dict:
    """Quantize the HF causal LM at `model_path` with GPTQ and save it (with its tokenizer) to `out_path`.

    Returns facts: bits, group_size (as used), requested_group_size, n_samples, calibration_file,
    seconds (load + calibrate + quantize + save), weight_file_bytes (the safetensors written),
    source_weight_file_bytes, cpu_kernel ("int4pack" or "torch": see `load_quantized`).
    """
    if bits not in BITS:
        raise ConfigError("bits", f"{bits} is not supported; expected one of {', '.join(map(str, BITS))}")
    if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
        raise ConfigError("group_size", f"{group_size} is not a power of two >= 16 (or -1 for one group "
                          "per output channel); 128 is the usual choice")
    if n_samples < 1:
        raise ConfigError("n_samples", f"expected at least 1 calibration sample, got {n_samples}")
    if max_len < 2:
        raise ConfigError("max_len", f"expected at least 2 tokens per calibration sample, got {max_len}")
    src = _check_model_dir(model_path)
    out = Path(out_path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("out_path", f"{out} already exists and is not an empty directory; "
                          "choose a new output directory")
    gptqmodel = _require_gptqmodel()

    from coati_ray.models.loading import load_config, load_tokenizer

    tokenizer = load_tokenizer(str(src))
    in_features = _linear_in_features(load_config(str(src)))
    used_group = choose_group_size(group_size, in_features)
    if used_group != group_size:
        logger.warning("group_size %d does not divide the input features of every layer (%s); using %s",
                       group_size, ", ".join(map(str, sorted(set(in_features)))),
                       "per-channel quantization (group_size -1)" if used_group == -1 else f"group_size {used_group}")
    cal_path = calibration_file or _demo_sft_file()
    samples = calibration_samples(tokenizer, cal_path, n_samples, max_len, seed)

    random.seed(seed)
    torch.manual_seed(seed)
    qcfg_kw = {"bits": bits, "group_size": used_group, "offload_to_disk": False}
    if used_group == -1:
        qcfg_kw["act_group_aware"] = False  # gptqmodel's group-aware ordering needs groups
    t0 = time.perf_counter()
    made_out = not out.exists()
    try:
        with _quiet_gptqmodel():
            qmodel = gptqmodel.GPTQModel.load(str(src), gptqmodel.QuantizeConfig(**qcfg_kw),
                                              device="cuda:0" if torch.cuda.is_available() else "cpu")
            qmodel.quantize(samples, batch_size=min(8, len(samples)), tokenizer=tokenizer,
                            calibration_data_min_length=1)
            out.mkdir(parents=True, exist_ok=True)
            qmodel.save(str(out))
        tokenizer.save_pretrained(str(out))
    except BaseException:
        if made_out:  # no half-written checkpoint left behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    del qmodel

    qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    if qc.get("quant_method") != "gptq" or qc.get("bits") != bits:  # pragma: no cover - a gptqmodel change
        raise RuntimeError(f"gptqmodel wrote an unexpected quantization_config to {out}/config.json: {qc}")
    facts = {
        "bits": bits, "group_size": used_group, "requested_group_size": group_size,
        "n_samples": len(samples), "calibration_file": str(cal_path), "seconds": round(seconds, 2),
        "weight_file_bytes": _safetensors_bytes(out), "source_weight_file_bytes": _safetensors_bytes(src),
        "cpu_kernel": "int4pack" if bits == 4 and _int4pack_ok(used_group, in_features) else "torch",
        "out_path": str(out),
    }
    logger.info("quantized %s to %d-bit GPTQ (group_size %d) in %.1fs: %s", src, bits, used_group, seconds, out)
    return facts


def choose_group_size(requested: int, in_features: list[int]) -> int:
    """`requested` when it divides every layer's input features, else the largest standard size
    below it that does, else -1 (per output channel)."""
    if requested == -1 or all(k % requested == 0 for k in in_features):
        return requested
    for g in STANDARD_GROUP_SIZES:
        if g < requested and all(k % g == 0 for k in in_features):
            return g
    return -1


def calibration_samples(tokenizer, path: str | Path, n_samples: int, max_len: int, seed: int = 0) -> list[dict]:
    """Up to `n_samples` token-id samples from a data file, chosen at random (`seed`).

    Accepts our dataset layouts: SFT rows (instruction/input/output: prompt + response rendered
    with the chat template, as SFT trains on them), conversations (messages), preference pairs
    (prompt + chosen), plain text (`text`, as in PTX data) and prompts (`prompt`, rendered as a generation prompt).
    """
    from coati_ray.data.formatting import instruction_prompt, render_chat, render_prompt
    from coati_ray.data.loading import chat_columns, load_rows, pair_columns, prompt_columns, sft_columns, text_columns

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(str(path), "calibration file not found (no such file or directory)")
    layouts = [
        (sft_columns({}), lambda r: render_chat(tokenizer, instruction_prompt(r["instruction"], r["input"]),
                                                r["output"])[1]),
        (chat_columns({}), lambda r: tokenizer.apply_chat_template(r["messages"], tokenize=False)),
        (pair_columns({}), lambda r: render_chat(tokenizer, r["prompt"], r["chosen"])[1]),
        (text_columns({}), lambda r: r["text"]),
        (prompt_columns({}), lambda r: render_prompt(tokenizer, r["prompt"])),
    ]
    rows, render = None, None
    for columns, fn in layouts:
        try:
            rows, render = load_rows(path, columns, skip_bad_rows=True).dataset, fn
            break
        except DataError as e:
            if "missing field" not in e.message and "no usable rows" not in e.message:
                raise  # unreadable file: say so, do not try other layouts
    if rows is None:
        raise DataError(str(path), "no calibration text found: expected rows with instruction/output (SFT), messages, "
                        "prompt/chosen/rejected (pairs), text, or prompt fields")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    samples = []
    for i in order:
        ids = tokenizer(render(rows[i]), add_special_tokens=False)["input_ids"][:max_len]
        if len(ids) >= 2:
            samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        if len(samples) == n_samples:
            break
    if not samples:
        raise DataError(str(path), "no calibration sample of at least 2 tokens")
    return samples


# --------------------------------------------------------------------------------------------
# load and measure


def load_quantized(path: str, device: str = "cpu"):
    """(model, tokenizer) from a GPTQ checkpoint, loaded by transformers (optimum + gptqmodel kernels).

    On CPU, gptqmodel's default 4-bit kernels (aten int4pack) need every layer's input features
    divisible by a group size of 32..256; for checkpoints that are not (our tiny presets), the
    plain torch kernel is requested instead.
    """
    from transformers import AutoModelForCausalLM, GPTQConfig

    from coati_ray.models.loading import load_tokenizer

    src = _check_model_dir(path)
    qc = json.loads((src / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "gptq":
        raise ModelLoadError(f"{src}: config.json has no GPTQ quantization_config (quant_method "
                             f"{qc.get('quant_method')!r}); quantize the model first with scripts/quantize.py")
    _require_gptqmodel()
    try:
        import optimum  # noqa: F401  (transformers' GPTQ integration goes through optimum)
    except ImportError as e:
        raise MissingExtraError("optimum", "quant", "Loading a GPTQ checkpoint") from e
    kw = {}
    if str(device).startswith("cpu") and qc.get("bits") == 4 and not _int4pack_ok(qc.get("group_size", 128),
                                                                                   _checkpoint_in_features(src)):
        kw["quantization_config"] = GPTQConfig(bits=4, backend="torch")
    with _quiet_gptqmodel(), warnings.catch_warnings():
        # passing a GPTQConfig for its `backend` makes transformers warn that the rest is ignored
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src), device_map=device, **kw)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load the GPTQ checkpoint {src}: {e}") from e
    model.eval()
    return model, load_tokenizer(str(src))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (for a GPTQ model: the packed qweight,
    qzeros, scales and g_idx plus whatever stays unquantized: embeddings, norms, lm_head).
    Tensors shared between modules count once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape))
        if t.device.type == "meta" or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# helpers


def _require_gptqmodel():
    # gptqmodel's loader pool takes 2 CPU workers, but its default on <= 2 cores is 1 worker, which
    # fails ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1").
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(12, ((os.cpu_count() or 1) + 1) // 2))))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its import prints a banner
            import gptqmodel
    except ImportError as e:
        raise MissingExtraError("gptqmodel", "quant", PURPOSE) from e
    return gptqmodel


class _quiet_gptqmodel:
    """Keep gptqmodel's chatter out of the way while it runs, then restore what was there.

    Its LogBar logger ("logbar") prints every INFO line, per-layer table and progress bar to
    stdout (hundreds of lines for a tiny model): only its warnings are kept, and what it prints
    goes to stderr (progress bars included), so that stdout keeps our own output. Its per-run JSON logs
    go to ./logs relative to the working directory; they go to a temporary directory instead
    (the per-layer losses are also in the checkpoint's quant_log.csv).
    """

    QUIET: ClassVar[dict[str, int]] = {"logbar": logging.WARNING, "tokenicer": logging.WARNING}

    def __enter__(self):
        self.redirect = contextlib.redirect_stdout(sys.stderr)
        self.redirect.__enter__()
        self.levels = {name: logging.getLogger(name).level for name in self.QUIET}
        for name, level in self.QUIET.items():
            logging.getLogger(name).setLevel(level)
        self.module = self.tmp = None
        try:
            from gptqmodel.looper import loop_processor
        except ImportError:  # pragma: no cover - another gptqmodel layout
            return self
        if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
            self.module, self.tmp = loop_processor, tempfile.TemporaryDirectory(prefix="gptqmodel_logs_")
            self.old_dir, loop_processor._PROJECT_LOG_DIR = loop_processor._PROJECT_LOG_DIR, Path(self.tmp.name)
        return self

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        if self.module is not None:
            self.module._PROJECT_LOG_DIR = self.old_dir
            self.tmp.cleanup()
        self.redirect.__exit__(*exc)
        return False


def _check_model_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"{path}: no such model directory; expected a Hugging Face model directory "
                             "saved with save_pretrained")
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{path}: the directory has no config.json; expected a Hugging Face model directory")
    return p


def _demo_sft_file() -> str:
    from coati_ray.defaults import demo_file

    return demo_file("sft_train.json")


def _linear_in_features(config) -> list[int]:
    """Input features of the Linear layers GPTQ quantizes (all but the output embedding), read
    from a meta-device instance of the architecture (no weights are loaded)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_emb = model.get_output_embeddings()
    return [m.in_features for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m is not out_emb] or [config.hidden_size]


def _checkpoint_in_features(path: Path) -> list[int]:
    """Input features of a GPTQ checkpoint's quantized layers: the lengths of their g_idx."""
    from safetensors import safe_open

    dims = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            dims += [st.get_slice(k).get_shape()[0] for k in st.keys() if k.endswith(".g_idx")]  # noqa: SIM118
    return dims


def _int4pack_ok(group_size: int, in_features: list[int]) -> bool:
    return all((group_size if group_size != -1 else k) in CPU_INT4_GROUP_SIZES
               and k % (group_size if group_size != -1 else k) == 0 for k in in_features)


def _safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
