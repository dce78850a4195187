#!/usr/bin/env python
"""PPO benchmarks, each a ratio measured side by side in one run (medians over repeats):

  a) rollout tokens/s: HFBackend.generate in a Ray actor vs. a plain model.generate loop (tiny llama)
  b) PPO samples/s with 1, 2 and 4 generators (run_ppo, tiny policy + RM), vs. 1 generator
  c) share of the PPO step time in generate / score / train / sync (from b's 1- and 2-generator runs)
  d) weight sync of ~5M/50M/200M llama models: object store + HFBackend.load_weights vs. in-process copy

    python scripts/bench_ppo.py                       # the full benchmark (~15-25 min on 2 cores)
    python scripts/bench_ppo.py --quick               # smoke test (~5 min)
    python scripts/bench_ppo.py --skip b,c --out bench/ppo_ad.json

Prints one table per part and writes every number to JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

med = statistics.median


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same left-padded batch HFBackend.generate builds."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


class GenActor:
    """A GeneratorWorker's sampling path: load_causal_lm + HFBackend, in a Ray actor."""

    def __init__(self, path: str, threads: int):
        from coati_ray.engines.generation import HFBackend
        from coati_ray.models.loading import load_causal_lm, load_tokenizer

        torch.set_num_threads(threads)
        tok = load_tokenizer(path)
        self.backend = HFBackend(load_causal_lm(path), tok.eos_token_id, tok.pad_token_id, torch.device("cpu"))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, seed: int) -> tuple[int, float]:
        from coati_ray.engines.generation import SamplingParams

        t0 = time.perf_counter()
        out = self.backend.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, seed=seed))
        return sum(len(g.token_ids) for g in out), time.perf_counter() - t0


def part_a(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    import ray

    from coati_ray.data.formatting import render_prompt
    from coati_ray.defaults import default_model_dir, demo_file
    from coati_ray.models.loading import load_causal_lm, load_tokenizer
    from coati_ray.runtime import start_actor

    path = str(default_model_dir("llama", "tiny"))
    tok = load_tokenizer(path)
    lines = Path(demo_file("prompts_train.jsonl")).read_text().splitlines()[:args.gen_batch]
    rows = [json.loads(line) for line in lines]
    prompts = [tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"] for r in rows]
    model = load_causal_lm(path).eval()
    ids, mask = _left_pad(prompts, tok.pad_token_id)
    actor = start_actor(GenActor, "bench-generator", (path, threads), num_cpus=threads)
    N = args.gen_tokens

    @torch.no_grad()
    def plain(seed: int) -> float:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=N,
                             temperature=1.0, top_k=0, top_p=1.0,  # the distribution HFBackend samples
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        eos, new = tok.eos_token_id, out[:, ids.shape[1]:].tolist()  # count each row up to its first EOS
        return sum(r.index(eos) + 1 if eos in r else len(r) for r in new) / (time.perf_counter() - t0)

    def in_actor(seed: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        n, inner = ray.get(actor.generate.remote(prompts, N, seed))
        return n / (time.perf_counter() - t0), n / inner

    plain(0), in_actor(0)  # warm-up
    rates: dict[str, list[float]] = {"plain": [], "actor": [], "actor_inner": []}
    for rnd in range(args.gen_rounds):  # interleaved, alternating who goes first
        for who in (("plain", "actor") if rnd % 2 == 0 else ("actor", "plain")):
            if who == "plain":
                rates["plain"].append(plain(rnd + 1))
            else:
                for k, v in zip(("actor", "actor_inner"), in_actor(rnd + 1)):
                    rates[k].append(v)
    ray.kill(actor)
    res = {k: med(v) for k, v in rates.items()}
    res.update(ratio=res["actor"] / res["plain"], samples=rates, batch=len(prompts), max_new_tokens=N,
               threads=threads, rounds=args.gen_rounds)
    print(f"\n(a) rollout tokens/s, tiny llama, {len(prompts)} prompts x {N} new tokens, {threads} torch threads, "
          f"median of {args.gen_rounds} interleaved rounds")
    print(f"{'run':<44} {'tokens/s':>9} {'vs plain':>9}")
    print(f"{'plain model.generate loop (driver process)':<44} {res['plain']:>9.0f} {1.0:>9.2f}")
    print(f"{'HFBackend in a Ray actor (at the driver)':<44} {res['actor']:>9.0f} {res['ratio']:>9.2f}")
    print(f"{'  same, inside the actor (no Ray call)':<44} {res['actor_inner']:>9.0f} "
          f"{res['actor_inner'] / res['plain']:>9.2f}   (target >= 0.9 at the driver)")
    return res


def _ppo_run(args: argparse.Namespace, gens: int) -> list[dict[str, float]]:
    from coati_ray.defaults import default_model_dir
    from coati_ray.pipelines.ppo import run_ppo
    from coati_ray.ppo_config import PPOConfig

    path = str(default_model_dir("llama", "tiny"))
    with tempfile.TemporaryDirectory(prefix="coati_bench_ppo-") as save:
        cfg = PPOConfig.of(pretrain=path, rm_path=path, experience_batch_size=args.ppo_batch,
                           train_batch_size=args.ppo_train_batch, max_steps=args.ppo_steps,
                           max_new_tokens=args.ppo_tokens, save_path=save, actors=gens, trainers=1,
                           sync_check_interval=0, log_interval=10 ** 6)  # no sync checks, one metrics line
        return run_ppo(cfg, progress=False).history


PHASES = {"generate": ("timing/generate",), "score": ("timing/score", "timing/values"),
          "train": ("timing/train",), "sync": ("timing/sync", "timing/sync_load")}


def part_bc(args: argparse.Namespace, gen_counts: list[int], do_b: bool, do_c: bool) -> dict[str, Any]:
    steps: dict[int, list[dict[str, float]]] = {g: [] for g in gen_counts}
    for rep in range(args.ppo_repeats):  # interleaved: 1, 2, 4, 1, 2, 4, ...
        for g in gen_counts:
            print(f"  (b) run_ppo: {g} generator(s), repeat {rep + 1}/{args.ppo_repeats}", flush=True)
            steps[g].extend(_ppo_run(args, g)[1:])  # step 1 is warm-up
    out: dict[str, Any] = {}
    if do_b:
        b = {str(g): {"samples_per_s": med([m["perf/samples_per_s"] for m in s]),
                      "step_s": med([m["timing/step"] for m in s]), "steps": len(s)} for g, s in steps.items()}
        base = b[str(gen_counts[0])]["samples_per_s"]
        print(f"\n(b) PPO samples/s, tiny policy + RM, {args.ppo_batch} prompts x {args.ppo_tokens} new tokens "
              "per step, "
              f"median of steps 2..{args.ppo_steps} over {args.ppo_repeats} interleaved repeat(s)")
        print(f"    NB: {os.cpu_count()} CPU cores: the generators (and reference, reward, critic, trainer actors) "
              "share the same cores")
        print(f"{'generators':<12} {'samples/s':>10} {'vs 1':>7} {'step s':>8} {'steps':>6}")
        for g, r in b.items():
            r["ratio_vs_1"] = r["samples_per_s"] / base
            print(f"{g:<12} {r['samples_per_s']:>10.2f} {r['ratio_vs_1']:>7.2f} {r['step_s']:>8.2f} {r['steps']:>6}")
        out["b"] = b
    if do_c:
        c = {}
        print("\n(c) share of the PPO step time per phase (median phase / median step; score = score + values, "
              "sync = publish + generator load)")
        print(f"{'generators':<12} {'step s':>8} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'other':>7}")
        for g in [g for g in gen_counts if g <= 2]:
            s = steps[g]
            step = med([m["timing/step"] for m in s])
            share = {p: med([sum(m.get(k, 0.0) for k in keys) for m in s]) / step for p, keys in PHASES.items()}
            share["other"] = 1.0 - sum(share.values())
            c[str(g)] = {"step_s": step, "share": share}
            print(f"{g:<12} {step:>8.2f} " + " ".join(f"{share[p]:>9.1%}" for p in PHASES) + f" {share['other']:>7.1%}")
        out["c"] = c
    return out


SYNC_SIZES = {  # name: (hidden, layers, heads, ffn, vocab)
    "5M": (256, 6, 4, 688, 1056),
    "50M": (512, 6, 8, 1376, 32000),
    "200M": (1024, 11, 16, 2752, 32000),
}


def _llama(size: str):
    from transformers import LlamaConfig

    h, layers, heads, ffn, vocab = SYNC_SIZES[size]
    return LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=ffn, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


class SyncEnd:
    """One end of the weight sync: a randomly initialised llama in an HFBackend (publisher or loader)."""

    def __init__(self, size: str, threads: int):
        from transformers import AutoModelForCausalLM

        from coati_ray.engines.generation import HFBackend

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.backend = HFBackend(AutoModelForCausalLM.from_config(_llama(size)), 2, 0, torch.device("cpu"))

    def publish(self, version: int) -> Any:
        """As PolicyWorker.publish: the returned WeightUpdate is what lands in the object store."""
        from coati_ray.engines.generation import WeightUpdate

        return WeightUpdate(version, {k: v.detach() for k, v in self.backend.model.state_dict().items()})

    def load(self, weights: list) -> float:
        """As GeneratorWorker.rollout step 0: ray.get the update and copy it in; seconds taken."""
        import ray

        t0 = time.perf_counter()
        self.backend.load_weights(ray.get(weights[0]))
        return time.perf_counter() - t0


def _sync_one(size: str, threads: int, repeats: int) -> dict[str, Any]:
    """Interleaved repeats of both sync paths for one model size; medians (seconds) and the raw samples."""
    import ray
    from transformers import AutoModelForCausalLM

    from coati_ray.runtime import start_actor

    pub, ld = (start_actor(SyncEnd, f"bench-{role}-{size}", (size, threads), num_cpus=1) for role in ("pub", "load"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama(size))
    ray.get([pub.__ray_ready__.remote(), ld.__ray_ready__.remote()])

    def store(version: int) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        ref = pub.publish.remote(version)
        ray.wait([ref], fetch_local=False)  # run_ppo waits for the publish, then generators load
        t_pub = time.perf_counter() - t0
        load_s = ray.get(ld.load.remote([ref]))
        return time.perf_counter() - t0, t_pub, load_s  # the ref dies here: the store frees it

    def local() -> float:
        t0 = time.perf_counter()
        copy = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(copy)
        return time.perf_counter() - t0

    store(1), local()  # warm-up
    r: dict[str, list[float]] = {"store": [], "publish": [], "load": [], "local": []}
    for rep in range(repeats):
        for who in (("store", "local") if rep % 2 == 0 else ("local", "store")):
            if who == "local":
                r["local"].append(local())
            else:
                for k, v in zip(("store", "publish", "load"), store(rep + 2)):
                    r[k].append(v)
    ray.kill(pub), ray.kill(ld)
    row: dict[str, Any] = {k: med(v) for k, v in r.items()}
    row.update(params=sum(p.numel() for p in model.parameters()), ratio=row["store"] / row["local"], samples=r,
               mb=sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2 ** 20)
    return row


def part_d(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    import gc

    res: dict[str, Any] = {}
    for size in args.sync_sizes:
        res[size] = _sync_one(size, threads, args.sync_repeats)
        gc.collect()
    print(f"\n(d) weight sync, random-init llama fp32, {threads} torch threads, median of {args.sync_repeats} "
          "interleaved repeats")
    print("    store = actor publishes WeightUpdate -> object store -> another actor ray.get + HFBackend.load_weights "
          "(end to end at the driver); local = clone state_dict + load_state_dict in one process")
    print(f"{'model':<7} {'params':>8} {'MB':>7} {'store s':>8} {'publish':>8} {'get+load':>9} {'local s':>8} "
          f"{'store/local':>12}")
    for size, row in res.items():
        print(f"{size:<7} {row['params'] / 1e6:>7.1f}M {row['mb']:>7.0f} {row['store']:>8.3f} {row['publish']:>8.3f} "
              f"{row['load']:>9.3f} {row['local']:>8.3f} {row['ratio']:>12.2f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and repeats: a smoke test")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip, of a,b,c,d")
    ap.add_argument("--out", default="bench/ppo.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, plain loop and actors")
    for name, default in (("gen_batch", 32), ("gen_tokens", 64), ("gen_rounds", 6), ("ppo_batch", 32),
                          ("ppo_train_batch", 16), ("ppo_steps", 4), ("ppo_tokens", 32), ("ppo_repeats", 2),
                          ("sync_repeats", 5)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--sync_sizes", default="5M,50M,200M")
    args = ap.parse_args()
    if args.quick:
        args.gen_batch, args.gen_tokens, args.gen_rounds = 8, 16, 2
        args.ppo_batch, args.ppo_train_batch, args.ppo_steps, args.ppo_tokens, args.ppo_repeats = 8, 8, 3, 8, 1
        args.sync_sizes, args.sync_repeats = "5M,50M", 2
    args.sync_sizes = [s for s in args.sync_sizes.split(",") if s]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set("abcd") or any(s not in SYNC_SIZES for s in args.sync_sizes):
        ap.error(f"--skip takes parts of a,b,c,d; --sync_sizes sizes of {','.join(SYNC_SIZES)}")

    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from coati_ray.cli import setup_logging
    from coati_ray.cluster.ray_env import init_ray
    from coati_ray.defaults import default_model_dir, demo_data_dir
    from coati_ray.runtime import quiet_libraries

    setup_logging()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    default_model_dir("llama", "tiny"), demo_data_dir()  # built once, before any actor races to
    # run_ppo with 4 generators asks for 8 logical CPUs (4 generators + reference, reward, critic, trainer);
    # its init_ray is a no-op once this Ray is up, so every part shares it.
    init_ray(None, num_cpus=8)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        if "a" not in skip:
            results["a"] = part_a(args, args.threads)
        gen_counts = [1, 2, 4] if "b" not in skip else [1, 2] if "c" not in skip else []
        if gen_counts:
            results.update(part_bc(args, gen_counts, "b" not in skip, "c" not in skip))
        if "d" not in skip:
            results["d"] = part_d(args, args.threads)
    finally:
        ray.shutdown()
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "cpu_count": os.cpu_count(), "results": results},
                                         indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
