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
import json
import statistics
import subprocess
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


def rollout(args, size: str, root: Path) -> dict:
    """Part a for one model: both backends, interleaved rounds, the first round not counted."""
    from coati_ray.engines.generation import SamplingParams

    hf, vl, start = backends(model_dir(size, root), 512, args.mem)
    vocab = hf.model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 24, (args.batch,), generator=g)]
    times: dict[str, list[float]] = {"hf": [], "vllm": []}
    tokens: dict[str, list[int]] = {"hf": [], "vllm": []}
    for r in range(args.repeats + 1):
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
    return row


def sync(args, size: str, root: Path) -> dict:
    """Part b for one model: load_weights of a new full version into each backend, interleaved."""
    from coati_ray.engines.generation import WeightUpdate

    hf, vl, _ = backends(model_dir(size, root), 256, args.mem)
    sd = {k: v.clone() for k, v in hf.model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    times: dict[str, list[float]] = {"hf": [], "vllm": []}
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
    return row


def in_subprocess(part: str, size: str, args) -> dict:
    """One model's measurement in a fresh process: vLLM on CPU counts the whole process's memory,
    and an engine's memory is not given back when it is dropped."""
    cmd = [sys.executable, __file__, "--one", f"{part}:{size}", "--repeats", str(args.repeats), "--batch",
           str(args.batch), "--new_tokens", str(args.new_tokens), "--mem", str(args.mem)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{part}:{size} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


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
    ap.add_argument("--one", help=argparse.SUPPRESS)  # PART:SIZE, run in a subprocess by the main process
    args = ap.parse_args()
    if args.one:
        part, size = args.one.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            row = (rollout if part == "a" else sync)(args, size, Path(tmp))
        print("RESULT " + json.dumps(row))
        return
    gen_sizes, sync_sizes = ["tiny", "50M"], ["50M", "200M"]
    if args.quick:
        gen_sizes, sync_sizes, args.repeats = ["tiny"], ["5M"], 1
    import vllm

    env = {"torch": torch.__version__, "vllm": vllm.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    print(env)
    a = [in_subprocess("a", s, args) for s in gen_sizes]
    table(f"a) rollout: {args.batch} prompts x up to {args.new_tokens} new tokens, fp32, "
          f"median of {args.repeats} interleaved rounds", a)
    b = [in_subprocess("b", s, args) for s in sync_sizes]
    table(f"b) weight sync: load_weights of a full fp32 update, median of {args.repeats} interleaved", b)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "a": a, "b": b}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
