#!/usr/bin/env python
"""Serving benchmarks, measured side by side in one run (medians over repeats):

  a) weight memory of fp32, bf16, 8-bit and 4-bit GPTQ: the tiny preset and a random ~100M llama
  b) generation tokens/s on CPU, full precision vs 4-bit (one request at a time, greedy)
  c) requests/s of the HTTP server (launchers/serve.py, tiny preset) at 1, 8 and 32 concurrent clients

    python scripts/bench_serve.py                      # all parts (quantization needs the `quant` extra)
    python scripts/bench_serve.py --skip a,b            # only the server's requests/s

Prints a table per part and writes every number to JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
med = statistics.median


def random_llama_100m(out: Path) -> str:
    """A random llama of ~100M parameters with our tokenizer (hidden 768, 12 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from coati_ray.defaults import default_model_dir
    from coati_ray.models.loading import load_tokenizer

    tok = load_tokenizer(str(default_model_dir("llama", "tiny")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def part_a_b(models: dict[str, str], tmp: Path, repeats: int, new_tokens: int) -> list[dict]:
    import torch

    from coati_ray.models.loading import load_causal_lm, load_tokenizer
    from coati_ray.serve.quantize import load_quantized, quantize, weight_bytes

    rows = []
    for name, path in models.items():
        row = {"model": name}
        fp32 = load_causal_lm(path, dtype="fp32")
        row["params"] = sum(p.numel() for p in fp32.parameters())
        row["fp32_bytes"] = weight_bytes(fp32)
        row["bf16_bytes"] = weight_bytes(load_causal_lm(path, dtype="bf16"))
        tok = load_tokenizer(path)
        prompt = tok("小明有3个苹果，又买了5个。 How many apples?", return_tensors="pt")
        for bits in (8, 4):
            out = tmp / f"{name}-gptq{bits}"
            facts = quantize(path, str(out), bits=bits, n_samples=64)
            q, _ = load_quantized(str(out))
            row[f"int{bits}_bytes"] = weight_bytes(q)
            row[f"int{bits}_quantize_s"] = facts.get("seconds")
            if bits == 4:
                row["int4_tokens_per_s"] = _tokens_per_s(q, prompt, repeats, new_tokens)
        row["fp32_tokens_per_s"] = _tokens_per_s(fp32, prompt, repeats, new_tokens)
        row["int4_vs_bf16"] = row["int4_bytes"] / row["bf16_bytes"]
        rows.append(row)
        del fp32
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def _tokens_per_s(model, prompt, repeats: int, new_tokens: int) -> float:
    import torch

    speeds = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            speeds.append((out.shape[1] - prompt["input_ids"].shape[1]) / (time.perf_counter() - t0))
    return med(speeds[1:])


def part_c(concurrency: list[int], requests_per_level: int) -> list[dict]:
    import requests

    from coati_ray.defaults import default_model_dir
    from coati_ray.serve.process import ServerProcess

    with ServerProcess(str(default_model_dir("llama", "tiny")), "--served_model_name", "tiny") as server:
        base = server.base
        body = {"model": "tiny", "max_tokens": 32, "temperature": 0.7,
                "messages": [{"role": "user", "content": "小红有4支笔，又买了3支。一共有多少支笔？"}]}

        def ask(i: int) -> int:
            r = requests.post(base + "/v1/chat/completions", json={**body, "seed": i}, timeout=600)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        rows = []
        for c in concurrency:
            n = max(requests_per_level, c)
            with ThreadPoolExecutor(c) as pool:
                list(pool.map(ask, range(c)))  # warm-up round
                t0 = time.perf_counter()
                tokens = sum(pool.map(ask, range(n)))
                wall = time.perf_counter() - t0
            stats = requests.get(base + "/stats").json()
            rows.append({"clients": c, "requests": n, "requests_per_s": n / wall, "tokens_per_s": tokens / wall,
                         "max_batch": stats["max_batch"]})
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", default="", help="parts to skip, e.g. a,b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least the level)")
    ap.add_argument("--out", default="bench/serve.json")
    args = ap.parse_args()
    skip = set(args.skip.split(",")) - {""}
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    result: dict = {"args": vars(args), "cpu_count": os.cpu_count()}
    if not {"a", "b"} <= skip:
        from coati_ray.defaults import default_model_dir

        with tempfile.TemporaryDirectory() as tmp:
            models = {"tiny": str(default_model_dir("llama", "tiny")),
                      "llama-100m": random_llama_100m(Path(tmp) / "llama-100m")}
            result["memory_speed"] = rows = part_a_b(models, Path(tmp), args.repeats, args.new_tokens)
        print("\nweight memory (parameters + buffers) and greedy generation on CPU, batch 1")
        print("| model | params | fp32 MB | bf16 MB | 8-bit MB | 4-bit MB | 4-bit vs bf16 | fp32 tok/s | 4-bit tok/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['fp32_bytes'] / 2**20:.1f} | "
                  f"{r['bf16_bytes'] / 2**20:.1f} | {r['int8_bytes'] / 2**20:.1f} | {r['int4_bytes'] / 2**20:.1f} | "
                  f"{1 - r['int4_vs_bf16']:.0%} smaller | {r['fp32_tokens_per_s']:.1f} | "
                  f"{r['int4_tokens_per_s']:.1f} |")
    if "c" not in skip:
        result["server"] = rows = part_c([1, 8, 32], args.requests)
        print("\nlaunchers/serve.py, tiny preset, fp32, 32 new tokens per request")
        print("| concurrent clients | requests/s | vs 1 client | generated tokens/s | largest batch |")
        print("|---|---|---|---|---|")
        for r in rows:
            speedup = r["requests_per_s"] / rows[0]["requests_per_s"]
            print(f"| {r['clients']} | {r['requests_per_s']:.2f} | {speedup:.2f}x"
                  f" | {r['tokens_per_s']:.0f} | {r['max_batch']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
