#!/usr/bin/env python
"""PPO on a simulated multi-node cluster: samples/s with 1, 2 and 4 generators for a fixed trainer
count, and where the generators' time goes (generating / waiting on weights / waiting on a full buffer).

The cluster is one raylet per node on this machine (cluster.yaml's node types, scaled down): a head,
two rollout nodes and one trainer node. Each configuration is one run_ppo on it, back to back in
one process, so the rows are measured side by side.

    python scripts/bench_cluster.py                       # 1, 2, 4 generators; on-policy and --max_staleness 1
    python scripts/bench_cluster.py --generators 1,2 --steps 6 --out bench/cluster_quick.json

Samples/s is the median over the steps after the first two (start-up and first loads excluded).
The generators' time shares come from the buffer's dispatcher: a generator is busy from the
dispatch of a chunk to its acceptance (its weight loads, counted apart, included), idle on a full
buffer when the next chunk waits for room, and idle on weights when no chunk may start yet (on-policy:
the step's samples need the weights the trainer is still making).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(gens: int, staleness: int, steps: int, save: Path, preset: str) -> dict:
    from coati_ray.defaults import default_model_dir
    from coati_ray.pipelines.ppo import run_ppo
    from coati_ray.ppo_config import PPOConfig

    model = str(default_model_dir("llama", preset))
    cfg = PPOConfig.of(pretrain=model, rm_path=model, experience_batch_size=8, n_samples_per_prompt=2,
                       max_new_tokens=24, train_batch_size=8, max_steps=steps, max_staleness=staleness,
                       advantage_estimator="grpo", sync_check_interval=0, log_interval=10_000, save_path=str(save),
                       actors=gens, placement="nodes", trainers=1, cpus_per_trainer=1)
    t0 = time.perf_counter()
    r = run_ppo(cfg, progress=False)
    wall = time.perf_counter() - t0
    h, last = r.history, r.history[-1]
    steady = h[2:] or h
    load_s = sum(m["timing/sync_load"] for m in h)  # slowest generator's weight load per step
    gen_total = last["generators/busy_s"] + last["generators/wait_weights_s"] + last["generators/wait_buffer_s"]
    return {"generators": gens, "max_staleness": staleness, "steps": len(h), "wall_s": wall,
            "samples_per_s": statistics.median(m["perf/samples_per_s"] for m in steady),
            "step_s": statistics.median(m["timing/step"] for m in steady),
            "busy_share": last["generators/busy_s"] / gen_total,
            "wait_weights_share": last["generators/wait_weights_share"],
            "wait_buffer_share": last["generators/wait_buffer_share"],
            "load_weights_s_per_step": load_s / len(h),
            "generators_used": sorted({g for step in r.made_by for g in step})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generators", default="1,2,4")
    ap.add_argument("--staleness", default="0,1", help="--max_staleness values to run (0: on-policy)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "micro"])
    ap.add_argument("--out", default="bench/cluster.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local stand-in cluster: no token needed
    import ray

    from coati_ray.cluster.placement import ROLLOUT, TRAINER
    from coati_ray.testing.simulated_cluster import start_sim_cluster

    nodes = [{"num_cpus": 3, "resources": {ROLLOUT: 1}}, {"num_cpus": 3, "resources": {ROLLOUT: 1}},
             {"num_cpus": 3, "resources": {TRAINER: 1}}]
    sim = start_sim_cluster(nodes, head_cpus=2, connect=False)
    ray.init(address=sim.cluster.address, namespace="coati_ray_bench", logging_level="ERROR")
    sim.connected = True
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in (int(x) for x in args.staleness.split(",")):
                for g in (int(x) for x in args.generators.split(",")):
                    rows.append(run(g, k, args.steps, Path(tmp) / f"g{g}_k{k}", args.preset))
                    print(f"done: {g} generators, max_staleness {k}: {rows[-1]['samples_per_s']:.1f} samples/s",
                          flush=True)
    finally:
        sim.shutdown()
    base = {r["max_staleness"]: r["samples_per_s"] for r in rows if r["generators"] == rows[0]["generators"]}
    print(f"\nPPO on a simulated cluster ({args.preset} llama, 1 trainer, grpo, 16 samples/step, "
          f"{os.cpu_count()} real cores shared by every node)")
    print("| generators | max_staleness | samples/s (median) | vs first row | step s | generators busy | "
          "wait on weights | wait on full buffer |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['generators']} | {r['max_staleness']} | {r['samples_per_s']:.1f} | "
              f"{r['samples_per_s'] / base[r['max_staleness']]:.2f}x | {r['step_s']:.2f} | {r['busy_share']:.0%} | "
              f"{r['wait_weights_share']:.0%} | {r['wait_buffer_share']:.0%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "cpu_count": os.cpu_count(), "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
