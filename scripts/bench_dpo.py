#!/usr/bin/env python
"""DPO measured beside an SFT step on the same data, and against PPO on the demo task.

    python scripts/bench_dpo.py --part step              # DPO vs SFT step: samples/s, tokens/s, peak memory
    python scripts/bench_dpo.py --part demo --seeds 42 1 2   # DPO vs PPO from one SFT policy: gold, time, memory
    python scripts/bench_dpo.py                          # both

Part `step`: one trainer each, in its own process (so its peak RSS is its own), runs interleaved SFT, DPO,
SFT, DPO, ... on the same rows (the demo pairs; SFT trains on prompt + chosen), tiny preset, fp32, the
same micro-batch. A DPO row is a pair: two sequences forward and backward; its reference log-probs are
computed once before training (reported apart: `reference_s`). Step times are medians over steps 2..N.

Part `demo`: per seed, the demo's SFT policy once, then from it (a) DPO on the demo pairs (recipe dpo) and
(b) the reward model + PPO against it (recipe rlhf), each gold-scored on the held-out prompts; seconds of
each path and the peak PSS of the whole process tree (this process, Ray and its actors) during it.

Writes bench/dpo.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(stage: str, steps: int, batch: int, data: str, out: str) -> None:
    """One run in this process (no Ray): stage 'sft' on `data`'s SFT rows or 'dpo' on its pairs."""
    from coati_ray.config import ClusterArgs, ModelArgs, PreferenceArgs, PreferenceDataArgs, SFTDataArgs, TrainArgs
    from coati_ray.pipelines.supervised import run_training

    ta = TrainArgs(batch_size=batch, max_steps=steps, lr=1e-4, log_interval=10 ** 6, save_path=tempfile.mkdtemp(),
                   warmup_ratio=0.0)
    da = (SFTDataArgs(dataset=f"{data}/sft.jsonl", eval_split=0.0) if stage == "sft"
          else PreferenceDataArgs(dataset=f"{data}/pairs.jsonl", eval_split=0.0))
    r = run_training(stage, ModelArgs(), da, ta, ClusterArgs(trainers=1), local=True, progress=False,
                     pref=PreferenceArgs() if stage == "dpo" else None)
    Path(out).write_text(json.dumps({
        "step_s": [m["perf/step_time"] for m in r.history], "tokens_per_s": [m["perf/tokens_per_s"] for m in r.history],
        "reference_s": r.setup.reference_seconds, "rows": r.setup.n_train,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def step_data(root: Path, n: int) -> None:
    """The first n demo pairs as pairs.jsonl, and as SFT conversations (prompt + chosen) in sft.jsonl."""
    from coati_ray.data.conversations import as_messages
    from coati_ray.data.loading import load_rows, pair_schema
    from coati_ray.defaults import demo_file

    rows = list(load_rows(demo_file("rm_train.jsonl"), pair_schema({}), max_samples=n).dataset)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(root / "sft.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            turns = as_messages(r["prompt"]) + [{"role": "assistant", "content": r["chosen"]}]
            f.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")


def part_step(rounds: int, steps: int, batch: int) -> dict:
    data = Path(tempfile.mkdtemp())
    step_data(data, steps * batch)
    runs: dict[str, list[dict]] = {"sft": [], "dpo": []}
    for _ in range(rounds):
        for stage in ("sft", "dpo"):
            out = data / f"{stage}.json"
            subprocess.run([sys.executable, __file__, "--worker", stage, "--steps", str(steps), "--batch", str(batch),
                            "--data", str(data), "--out", str(out)], check=True, timeout=1800, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
            runs[stage].append(json.loads(out.read_text()))
    res = {}
    for stage, rs in runs.items():
        step = statistics.median(s for r in rs for s in r["step_s"][1:])
        res[stage] = {"step_s": step, "samples_per_s": batch / step,
                      "tokens_per_s": statistics.median(t for r in rs for t in r["tokens_per_s"][1:]),
                      "max_rss_mb": statistics.median(r["max_rss_mb"] for r in rs),
                      "reference_s": statistics.median(r["reference_s"] for r in rs), "rows": rs[0]["rows"]}
    res["ratio"] = {"samples_per_s": res["dpo"]["samples_per_s"] / res["sft"]["samples_per_s"],
                    "max_rss": res["dpo"]["max_rss_mb"] / res["sft"]["max_rss_mb"],
                    "reference_vs_epoch": res["dpo"]["reference_s"] / (res["dpo"]["step_s"] * steps)}
    res["setup"] = {"rounds": rounds, "steps": steps, "batch": batch, "model": "tiny preset", "cores": os.cpu_count()}
    return res


def part_demo(seeds: list[int]) -> dict:
    from coati_ray.config import ClusterArgs
    from coati_ray.pipelines.demo import DemoArgs, finish_dpo, finish_ppo
    from coati_ray.pipelines.demo_models import train_reward_model, train_stage12
    from coati_ray.testing.memory import TreeMemory

    rows = []
    for seed in seeds:
        out = Path(tempfile.mkdtemp()) / f"seed{seed}"
        a, cluster = DemoArgs(seed=seed, out=str(out)), ClusterArgs()
        t0 = time.perf_counter()
        st = train_stage12(a, out, cluster, reward_model=False)
        with TreeMemory(os.getpid(), every_s=0.5) as mem_dpo:
            t1 = time.perf_counter()
            d = finish_dpo(a, out, cluster, st, t0, t1)
        with TreeMemory(os.getpid(), every_s=0.5) as mem_ppo:
            t2 = time.perf_counter()
            st_rm = train_reward_model(a, out, cluster, st)
            p = finish_ppo(a, out, st_rm, t0, time.perf_counter())
            t_ppo = time.perf_counter() - t2
        rows.append({"seed": seed, "gold_sft": d["gold"]["sft"], "gold_dpo": d["gold"]["dpo"],
                     "gold_ppo": p["gold"]["ppo"], "dpo_s": d["dpo"]["seconds"], "rm_ppo_s": round(t_ppo, 1),
                     "dpo_reference_s": round(d["dpo"]["reference_seconds"], 1),
                     "dpo_accuracy": d["dpo"]["eval_accuracy"], "rm_accuracy": p["rm"]["eval_accuracy"],
                     "peak_pss_mb_dpo": round(mem_dpo.peak_mb), "peak_pss_mb_rm_ppo": round(mem_ppo.peak_mb),
                     "sft_s": round(st["t_sft"], 1)})
        print(json.dumps(rows[-1]), flush=True)
    return {"seeds": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["step", "demo", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=2, help="step: interleaved SFT/DPO rounds")
    ap.add_argument("--steps", type=int, default=20, help="step: optimizer steps per run")
    ap.add_argument("--batch", type=int, default=16, help="step: rows (SFT) / pairs (DPO) per step")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="demo: seeds")
    ap.add_argument("--json", default=str(ROOT / "bench" / "dpo.json"))
    ap.add_argument("--worker", choices=["sft", "dpo"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.batch, args.data, args.out)
    from coati_ray.cli import setup_logging

    setup_logging()
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.exists() else {}
    if args.part in ("step", "all"):
        s = result["step"] = part_step(args.rounds, args.steps, args.batch)
        print("\n| tiny preset, 1 trainer, batch %d | SFT | DPO | DPO / SFT |\n|---|---|---|---|" % args.batch)
        print(f"| samples/s (SFT rows, DPO pairs) | {s['sft']['samples_per_s']:.1f} | {s['dpo']['samples_per_s']:.1f} "
              f"| {s['ratio']['samples_per_s']:.2f}x |")
        print(f"| tokens/s | {s['sft']['tokens_per_s']:.0f} | {s['dpo']['tokens_per_s']:.0f} | |")
        print(f"| peak RSS of the trainer (MB) | {s['sft']['max_rss_mb']:.0f} | {s['dpo']['max_rss_mb']:.0f} "
              f"| {s['ratio']['max_rss']:.2f}x |")
        print(f"| reference pass before training (s, {s['dpo']['rows']} pairs) | | {s['dpo']['reference_s']:.1f} | "
              f"{s['ratio']['reference_vs_epoch']:.2f}x the time of one training pass |")
    if args.part in ("demo", "all"):
        d = result["demo"] = part_demo(args.seeds)
        print("\n| seed | gold SFT | gold DPO | gold RM+PPO | DPO s | RM+PPO s | peak PSS DPO (MB) "
              "| peak PSS RM+PPO (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in d["seeds"]:
            print(f"| {r['seed']} | {r['gold_sft']:.3f} | {r['gold_dpo']:.3f} | {r['gold_ppo']:.3f} | {r['dpo_s']:.0f} "
                  f"| {r['rm_ppo_s']:.0f} | {r['peak_pss_mb_dpo']} | {r['peak_pss_mb_rm_ppo']} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
