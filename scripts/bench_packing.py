#!/usr/bin/env python
"""Padding-free packing against padding: SFT and RM training steps on the demo data (issue 18).

The same micro-batches (16 rows drawn with a fixed seed from the demo SFT / RM training data,
which mixes single-turn rows with multi-turn dialogues) go through one forward + backward of the
tiny llama preset, padded to the longest row and packed (coati_ray/data/packing.py), alternating
padded / packed per batch so that machine noise hits both alike. Reports the share of padded
positions each way, the median step time and the ratio, and checks that both give the same loss.

    python scripts/bench_packing.py                     # ~1-2 min on 2 cores
    python scripts/bench_packing.py --batches 40 --threads 2 --out bench/packing.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def measure(task, items: list, batches: int, batch_size: int, seed: int) -> dict:
    rng = random.Random(seed)
    model = task.build_model()
    model.train()
    times = {"padded": [], "packed": []}
    losses = {"padded": [], "packed": []}
    positions = {"padded": 0, "packed": 0}
    real = 0
    for b in range(batches):
        mb = [items[i] for i in rng.sample(range(len(items)), batch_size)]
        real += sum(n for it in mb for n in task.lengths(it))
        for mode in (("padded", "packed") if b % 2 == 0 else ("packed", "padded")):
            task.packing = mode == "packed"
            batch = task.collate(mb)
            positions[mode] += batch["input_ids"].numel()
            t = time.perf_counter()
            loss, _ = task.loss(model, batch)
            (loss / task.count(batch)).backward()
            times[mode].append(time.perf_counter() - t)
            losses[mode].append(loss.item() / task.count(batch))
            model.zero_grad(set_to_none=True)
    task.packing = True
    med = {m: statistics.median(v) for m, v in times.items()}
    worst = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(losses["padded"], losses["packed"]))
    return {"padding_share_padded": round(1 - real / positions["padded"], 3),
            "padding_share_packed": round(1 - real / positions["packed"], 3),
            "step_s_padded": round(med["padded"], 4), "step_s_packed": round(med["packed"], 4),
            "speedup": round(med["padded"] / med["packed"], 2), "loss_max_rel_diff": worst, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=30, help="micro-batches per stage (each run padded and packed)")
    p.add_argument("--batch_size", type=int, default=16, help="rows per micro-batch (the demo's SFT/RM batch)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trainer actor has 1 per CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/packing.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from coati_ray.config import ModelArgs, PairDataArgs, RMArgs, SFTDataArgs
    from coati_ray.defaults import default_model_dir, demo_file
    from coati_ray.runtime import quiet_libraries
    from coati_ray.workers.tasks import RMTask, SFTTask

    quiet_libraries()
    path = str(default_model_dir("llama", "tiny"))
    results = {}
    for stage, task in (("sft", SFTTask(path, ModelArgs(), SFTDataArgs(), demo_file("sft_train.json"), None, 0)),
                        ("rm", RMTask(path, ModelArgs(), PairDataArgs(), demo_file("rm_train.jsonl"), None, 0,
                                      rm_args=RMArgs()))):
        items = task.build_datasets().train
        results[stage] = measure(task, items, args.batches, args.batch_size, args.seed)
    print(f"| stage | padding (padded) | padding (packed) | step s padded | step s packed | speed-up | "
          f"loss rel diff | ({args.batches} micro-batches of {args.batch_size}, {args.threads} thread(s))")
    print("|---|---|---|---|---|---|---|")
    for stage, r in results.items():
        print(f"| {stage} | {r['padding_share_padded']:.0%} | {r['padding_share_packed']:.0%} | "
              f"{r['step_s_padded']:.3f} | {r['step_s_packed']:.3f} | {r['speedup']:.2f}x | "
              f"{r['loss_max_rel_diff']:.1e} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {args.out}")
    ok = all(r["loss_max_rel_diff"] < 1e-4 for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
