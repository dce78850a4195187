#!/usr/bin/env python
"""The chat server's generation engine against the alternatives, on the same model and load (issue 19):

  continuous  coati_ray.serve.engine.BatchingEngine: waiting requests join the running batch between steps
  static      the same engine admitting only into an empty batch (the engine before issue 19: a request
              that arrives mid-batch waits for the whole batch)
  hf-cb       transformers' continuous batching (`model.init_continuous_batching()`, paged attention)

Load: closed loop, 1, 8 and 32 concurrent clients, each sending its next request when the last one is
answered, 2 requests per client (4 for one client); greedy decoding (the same tokens whichever engine
runs them), prompts of 4 to 40 tokens, max tokens alternating 8 and 32 (--max_tokens). Rounds interleave
the engines (the order rotates) so that a busy machine slows all of them alike; each figure is the median
over rounds. Also `mid-batch`: the latency of an 8-token request sent while a 64-token one decodes.

    python scripts/bench_serve_batching.py                          # tiny preset and a random ~100M llama
    python scripts/bench_serve_batching.py --models tiny --rounds 5

Prints a table per model and writes every number to JSON (--out, default bench/serve_batching.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

ENGINES = ("continuous", "static", "hf-cb")
PROMPTS = ["What is 2 + 3?", "小明有3个苹果，又买了5个。一共有多少个？",
           "Tell me a story about a cat who learns to fly.", "hello",
           "Explain why the sky is blue, step by step, for a child of six years old who asks a lot."]


def static_engine(model, tokenizer, max_batch_size: int):
    """The engine admitting requests only when no batch runs: the static batching it did before issue 19."""
    from coati_ray.serve.engine import BatchingEngine

    class StaticEngine(BatchingEngine):
        def _room(self) -> int:
            return 0 if self._rows else self.max_batch_size
    return StaticEngine(model, tokenizer, max_batch_size)


class HFContinuous:
    """transformers' ContinuousBatchingManager behind our `submit(GenRequest)`. Greedy only (one generation
    config for all requests; per-request seeds and stop strings are not in its API), no streaming."""

    def __init__(self, model, tokenizer, max_batch_size: int):
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        self.tokenizer, self.pending, self.ids = tokenizer, {}, itertools.count()
        gen = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
        # Its KV cache is sized explicitly: left to itself on CPU it takes 60-90% of free RAM (13.6 GB here, and the
        # kernel's OOM killer). 48 pages of 256 tokens hold 32 requests of this load with room to spare.
        cfg = ContinuousBatchingConfig(max_requests_per_batch=max_batch_size, num_blocks=48, max_batch_tokens=2048)
        self.mgr = model.init_continuous_batching(gen, cfg)
        self.mgr.start()
        threading.Thread(target=self._deliver, daemon=True).start()

    def submit(self, req) -> None:
        rid = f"r{next(self.ids)}"
        self.pending[rid] = req  # before add_request: the answer may come back before it returns
        self.mgr.add_request(req.prompt_ids, request_id=rid, max_new_tokens=req.max_tokens)

    def _deliver(self) -> None:
        from coati_ray.serve.engine import Event

        while True:
            out = self.mgr.get_result(timeout=0.1)
            if out is None:
                continue
            req, ids = self.pending.pop(out.request_id), out.generated_tokens
            reason = "stop" if ids and ids[-1] == self.tokenizer.eos_token_id else "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            req.emit(Event(text, reason, len(req.prompt_ids), len(ids)))

    def close(self) -> None:
        self.mgr.stop(block=True)


def ask(engine, prompt_ids: list[int], max_tokens: int) -> float:
    """Send one greedy request and wait for its end; its latency in seconds."""
    from coati_ray.serve.engine import GenRequest

    done, t0 = threading.Event(), time.perf_counter()

    def emit(ev) -> None:
        if ev.finish_reason is not None:
            done.set()
    engine.submit(GenRequest(prompt_ids, max_tokens, emit, temperature=0))
    if not done.wait(600):
        raise TimeoutError(f"{type(engine).__name__}: no answer in 600 s")
    return time.perf_counter() - t0


def load(engine, prompts: list[list[int]], clients: int, n: int, max_tokens: list[int]) -> dict:
    """`n` requests from `clients` closed-loop clients: requests/s and latency percentiles."""
    work = [(prompts[i % len(prompts)], max_tokens[i % len(max_tokens)]) for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = sorted(pool.map(lambda w: ask(engine, *w), work))
    wall = time.perf_counter() - t0
    return {"requests_per_s": n / wall, "p50_s": statistics.median(lat), "p95_s": lat[min(n - 1, int(0.95 * n))]}


def mid_batch(engine, prompts: list[list[int]]) -> float:
    """Latency of an 8-token request sent while a 64-token one decodes."""
    long = threading.Thread(target=ask, args=(engine, prompts[2], 64))
    long.start()
    time.sleep(0.05)  # the long request is decoding by now (its prefill is a few ms); part of the load, not a wait
    lat = ask(engine, prompts[0], 8)
    long.join()
    return lat


def bench_model(path: str, levels: list[int], rounds: int, max_batch_size: int, max_tokens: list[int]) -> dict:
    from coati_ray.models.loading import load_causal_lm, load_tokenizer
    from coati_ray.serve.engine import BatchingEngine

    tok = load_tokenizer(path)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    engines = {"continuous": BatchingEngine(load_causal_lm(path), tok, max_batch_size),
               "static": static_engine(load_causal_lm(path), tok, max_batch_size),
               # its own copy: the manager switches the model to paged attention
               "hf-cb": HFContinuous(load_causal_lm(path), tok, max_batch_size)}
    for e in engines.values():  # warm-up
        load(e, prompts, 4, 4, max_tokens)
    runs: dict = {name: {c: [] for c in levels} | {"mid_batch_s": []} for name in ENGINES}
    for r in range(rounds):
        order = ENGINES[r % 3:] + ENGINES[:r % 3]
        for c in levels:
            for name in order:
                runs[name][c].append(load(engines[name], prompts, c, max(4, 2 * c), max_tokens))
        for name in order:
            runs[name]["mid_batch_s"].append(mid_batch(engines[name], prompts))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    engines["hf-cb"].close()
    out = {}
    for name in ENGINES:
        out[name] = {"mid_batch_s": statistics.median(runs[name]["mid_batch_s"]),
                     "levels": {c: {k: statistics.median(x[k] for x in runs[name][c]) for k in runs[name][c][0]}
                                for c in levels}, "rounds": runs[name]}
    out["continuous"]["stats"] = engines["continuous"].stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,llama-100m", help="comma-separated: tiny, llama-100m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients")
    ap.add_argument("--max_batch_size", type=int, default=32)
    ap.add_argument("--max_tokens", default="8,32", help="max tokens of the requests, in turn")
    ap.add_argument("--out", default="bench/serve_batching.json")
    args = ap.parse_args()
    import torch

    from coati_ray.defaults import default_model_dir

    levels = [int(c) for c in args.levels.split(",")]
    max_tokens = [int(t) for t in args.max_tokens.split(",")]
    result: dict = {"args": vars(args), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                path = str(default_model_dir("llama", "tiny"))
            else:
                from bench_serve import random_llama_100m

                path = random_llama_100m(Path(tmp) / name)
            print(f"{name}: {len(levels)} levels x {len(ENGINES)} engines x {args.rounds} rounds", flush=True)
            t0 = time.perf_counter()
            result["models"][name] = res = bench_model(path, levels, args.rounds, args.max_batch_size, max_tokens)
            res["seconds"] = time.perf_counter() - t0
            print(f"\n{name}, greedy, max tokens {args.max_tokens}, medians over {args.rounds} interleaved rounds")
            print("| clients | engine | requests/s | p50 s | p95 s |\n|---|---|---|---|---|")
            for c in levels:
                for e in ENGINES:
                    m = res[e]["levels"][c]
                    print(f"| {c} | {e} | {m['requests_per_s']:.2f} | {m['p50_s']:.3f} | {m['p95_s']:.3f} |")
            print("| mid-batch arrival (8 tokens during a 64-token answer) | "
                  + " / ".join(f"{e} {res[e]['mid_batch_s']:.3f} s" for e in ENGINES) + " |\n")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))  # after each model: a long run keeps what it has
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
