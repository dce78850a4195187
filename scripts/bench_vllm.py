#!/usr/bin/env python
"""The vllm backend against the hf backend, side by side in one process (medians over repeats):

  a) rollout tokens/s: the same model, prompts, sampling settings and seeds through
     HFBackend.generate and VLLMBackend.generate (a tiny ~4M llama and a ~50M llama)
  b) weight sync: load_weights of a full update into each backend (the step a generator runs
     after reading the update from Ray's object store), the ~50M and ~200M llamas

Run it in the vLLM environment (bash scripts/setup_vllm_cpu.sh on CPU):

    .venv-vllm/bin/python scripts/bench_vllm.py                 # ~10 min on 2 cores
    .venv-vllm/bin/python scripts/bench_vllm.py --quick         # smoke test

Prints a table per part and writes every number to JSON (--out, default bench/vllm.json).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # vLLM otherwise drops torch to 1 thread
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from scripts.bench_ppo import _llama

med = statistics.median


def model_dir(size: str, root: Path) -> str:
    """An HF directory: the demo's tiny preset, or a randomly initialised llama of SYNC_SIZES."""
    from coati_ray.defaults import default_model_dir

    if size == "tiny":
        return str(default_model_dir("llama", "tiny"))
    from transformers import AutoModelForCausalLM

    d = root / size
    if not d.exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(_llama(size)).save_pretrained(str(d))
        from transformers import AutoTokenizer

        from coati_ray.defaults import tokenizer_dir

        AutoTokenizer.from_pretrained(str(tokenizer_dir())).save_pretrained(str(d))
    return str(d)


def backends(path: str, max_len: int, mem: float):
    from coati_ray.engines.generation import HFBackend
    from coati_ray.engines.vllm_backend import VLLMBackend
    from coati_ray.models.loading import load_causal_lm

    eos, pad = 2, 0
    t0 = time.perf_counter()
    hf = HFBackend(load_causal_lm(path, "auto", "fp32"), eos, pad, torch.device("cpu"))
    t1 = time.perf_counter()
    # vLLM on CPU counts this whole process (HF copy included) against its memory share
    vl = VLLMBackend(path, "fp32", None, eos, pad, seed=0, max_model_len=max_len, gpu_memory_utilization=mem)
    t2 = time.perf_counter()
    return hf, vl, {"hf_start_s": t1 - t0, "vllm_start_s": t2 - t1}


def part_a(args, root: Path) -> list[dict]:
    from coati_ray.engines.generation import SamplingParams

    rows = []
    for size in args.gen_sizes:
        path = model_dir(size, root)
        hf, vl, start = backends(path, 512, args.mem)
        vocab = hf.model.config.vocab_size
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
                   for n in torch.randint(8, 24, (args.batch,), generator=g)]
        times = {"hf": [], "vllm": []}
        tokens = {"hf": [], "vllm": []}
        for r in range(args.repeats + 1):  # the first round warms both up and is not counted
            for name, b in (("hf", hf), ("vllm", vl)):
                p = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=100 + r)
                t0 = time.perf_counter()
                out = b.generate(prompts, p)
                dt = time.perf_counter() - t0
                if r:
                    times[name].append(dt)
                    tokens[name].append(sum(len(o.token_ids) for o in out))
        row = {"model": size, "params_M": sum(p.numel() for p in hf.model.parameters()) / 1e6,
               "batch": args.batch, "new_tokens": args.new_tokens, **start}
        for name in ("hf", "vllm"):
            row[f"{name}_tok_s"] = med(t / s for t, s in zip(tokens[name], times[name]))
            row[f"{name}_s"] = med(times[name])
        row["vllm_over_hf"] = row["vllm_tok_s"] / row["hf_tok_s"]
        rows.append(row)
        del vl, hf
        gc.collect()
    return rows


def part_b(args, root: Path) -> list[dict]:
    from coati_ray.engines.generation import WeightUpdate

    rows = []
    for size in args.sync_sizes:
        path = model_dir(size, root)
        hf, vl, _ = backends(path, 256, args.mem)
        sd = {k: v.clone() for k, v in hf.model.state_dict().items()}
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        times = {"hf": [], "vllm": []}
        for v in range(1, args.repeats + 2):
            for t in sd.values():
                t.mul_(1.0001)  # a new version
            update = WeightUpdate(v, sd)
            for name, b in (("hf", hf), ("vllm", vl)):
                t0 = time.perf_counter()
                b.load_weights(update)
                if v > 1:  # the first load of each warms up
                    times[name].append(time.perf_counter() - t0)
        row = {"model": size, "MB": nbytes / 2**20, "hf_load_s": med(times["hf"]), "vllm_load_s": med(times["vllm"])}
        row["vllm_over_hf"] = row["vllm_load_s"] / row["hf_load_s"]
        row["vllm_GB_s"] = nbytes / 2**30 / row["vllm_load_s"]
        rows.append(row)
        del vl, hf
        gc.collect()
    return rows


def table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print(" | ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print(" | ".join(f"{v:>12.3f}" if isinstance(v, float) else f"{v!s:>12}" for v in r.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/vllm.json")
    ap.add_argument("--mem", type=float, default=0.4, help="vLLM gpu_memory_utilization (on CPU: of RAM)")
    args = ap.parse_args()
    args.gen_sizes, args.sync_sizes = ["tiny", "50M"], ["50M", "200M"]
    if args.quick:
        args.gen_sizes, args.sync_sizes, args.repeats = ["tiny"], ["5M"], 1
    import vllm

    env = {"torch": torch.__version__, "vllm": vllm.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    print(env)
    with tempfile.TemporaryDirectory() as tmp:
        a = part_a(args, Path(tmp))
        table(f"a) rollout: {args.batch} prompts x up to {args.new_tokens} new tokens, fp32 (median of "
              f"{args.repeats})", a)
        b = part_b(args, Path(tmp))
        table(f"b) weight sync: load_weights of a full fp32 update (median of {args.repeats})", b)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "a": a, "b": b}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
