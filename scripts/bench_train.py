#!/usr/bin/env python
"""SFT training throughput: coati_ray trainer actors vs. a plain single-process PyTorch loop.

Same model (the tiny llama preset unless --pretrain), same tokenized demo data, same micro-batch
size per process, measured in one run. Prints a table and writes JSON (--out).

    python scripts/bench_train.py                 # ~3 min on 2 cores
    python scripts/bench_train.py --steps 40 --batch_size 8

Throughput is measured at the driver (wall time around each step, Ray call overhead included);
the median over steps after --warmup is reported. Peak memory is each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _job(args, strategy: str, trainers: int):
    from coati_ray.config import DataArgs, ModelArgs, TrainArgs
    from coati_ray.pipelines.supervised import make_job

    ta = TrainArgs(strategy=strategy, batch_size=args.batch_size, max_steps=args.steps + args.warmup,
                   save_path="/tmp/coati_bench", warmup_ratio=0.0)
    return make_job("sft", ModelArgs(pretrain=args.pretrain, preset_size=args.size),
                    DataArgs(max_samples=args.samples, max_len=args.max_len), ta, None)


def plain_loop(args, conn) -> None:
    """The baseline: one process, no Ray, no wrapper; the same task's model and batches."""
    import resource

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    job = _job(args, "ddp", 1)
    from coati_ray.workers.tasks import SFTTask

    task = SFTTask(job.model_path, job.model, job.data, job.train_file, job.eval_file, seed=0)
    data = task.build_datasets().train
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rates = []
    for step in range(args.steps + args.warmup):
        t0 = time.perf_counter()
        items = data[step * args.batch_size:(step + 1) * args.batch_size]
        batch = task.collate(items)
        s, n, _ = task.loss(model, batch)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens = int(batch["attention_mask"].sum())
        if step >= args.warmup:
            rates.append(tokens / (time.perf_counter() - t0))
    conn.send({"tokens_per_s": statistics.median(rates),
               "peak_mb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]})


def trainer_run(args, strategy: str, trainers: int) -> dict:
    from coati_ray.cluster.group import TrainerGroup

    cpus = (os.cpu_count() or 1) / trainers  # the same cores in total as the plain loop
    group = TrainerGroup(trainers, cpus_per_trainer=cpus)
    try:
        info = group.setup(_job(args, strategy, trainers))
        rates = []
        for step in range(args.steps + args.warmup):
            t0 = time.perf_counter()
            m = group.train_step()
            wall = time.perf_counter() - t0
            if step >= args.warmup:
                rates.append(m["perf/tokens_per_s"] * m["perf/step_time"] / wall)
        return {"tokens_per_s": statistics.median(rates), "peak_mb": group.peak_memory_mb(),
                "params": info.params}
    finally:
        group.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", default=None, help="HF model dir (default: the tiny preset)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "micro"])
    ap.add_argument("--batch_size", type=int, default=8, help="micro-batch per process")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--max_len", type=int, default=256)
    ap.add_argument("--out", default="bench/train.json")
    args = ap.parse_args()

    from coati_ray.cli import setup_logging
    from coati_ray.cluster.ray_env import init_ray

    setup_logging()
    _job(args, "ddp", 1)  # builds the defaults once, before any process races to
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=plain_loop, args=(args, child))
    p.start()
    rows = {"plain PyTorch loop (1 process)": parent.recv()}
    p.join()
    init_ray(None, num_cpus=os.cpu_count() or 1)
    for strategy in ("ddp", "fsdp"):
        for n in (1, 2):
            rows[f"coati_ray {strategy}, {n} trainer{'s' if n > 1 else ''}"] = trainer_run(args, strategy, n)
    base = rows["plain PyTorch loop (1 process)"]["tokens_per_s"]
    print(f"\nSFT throughput, {args.size} model, micro-batch {args.batch_size}, {os.cpu_count()} CPU cores, "
          f"median of {args.steps} steps")
    print(f"{'run':<34} {'tokens/s':>10} {'vs plain':>9} {'peak MB per process':>22}")
    for name, r in rows.items():
        r["ratio_vs_plain"] = r["tokens_per_s"] / base
        peaks = ", ".join(f"{m:.0f}" for m in r["peak_mb"])
        print(f"{name:<34} {r['tokens_per_s']:>10.0f} {r['ratio_vs_plain']:>9.2f} {peaks:>22}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "cpu_count": os.cpu_count(), "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
