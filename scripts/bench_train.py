#!/usr/bin/env python
"""SFT training throughput: coati_ray trainer actors vs. a plain single-process PyTorch loop.

Same model (the tiny llama preset unless --pretrain), same tokenized demo data, same micro-batch
size per process, measured in one run. Prints a table and writes JSON (--out).

    python scripts/bench_train.py                 # ~3 min on 2 cores
    python scripts/bench_train.py --steps 40 --batch_size 8

Throughput is measured at the driver (wall time around each step, Ray call overhead included);
all runs stay up and take turns in --rounds round-robin rounds, so machine noise hits them alike;
the median over steps is reported. Peak memory is each process's peak RSS.
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


def _job(args, strategy: str, trainers: int, total: int | None = None):
    from coati_ray.config import ModelArgs, SFTDataArgs, TrainArgs
    from coati_ray.pipelines.supervised import make_job

    ta = TrainArgs(strategy=strategy, batch_size=args.batch_size, max_epochs=1000, max_steps=total,
                   save_path="/tmp/coati_bench", warmup_ratio=0.0)
    return make_job("sft", ModelArgs(pretrain=args.pretrain, preset_size=args.size),
                    SFTDataArgs(max_samples=args.samples, max_len=args.max_len), ta, None)


def plain_loop(args, conn) -> None:
    """The baseline: one process, no Ray, no wrapper; the same task's model and batches.

    Runs as a child process that takes "run N steps" commands, so its rounds interleave with the
    trainer groups' rounds and all see the same machine noise.
    """
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
    step = 0
    while (n := conn.recv()) is not None:
        rates = []
        for _ in range(n):
            t0 = time.perf_counter()
            items = [data[(step * args.batch_size + i) % len(data)] for i in range(args.batch_size)]
            batch = task.collate(items)
            s, _ = task.loss(model, batch)
            (s / task.count(batch)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rates.append(int(batch["attention_mask"].sum()) / (time.perf_counter() - t0))
            step += 1
        conn.send(rates)
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


class Plain:
    def __init__(self, args):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=plain_loop, args=(args, child))
        self.proc.start()

    def run(self, n: int) -> tuple[list[float], list[float]]:
        self.conn.send(n)
        rates = self.conn.recv()
        return rates, rates

    def close(self) -> list[float]:
        self.conn.send(None)
        peak = self.conn.recv()
        self.proc.join()
        return [peak]


class Trainers:
    def __init__(self, args, strategy: str, trainers: int):
        from coati_ray.cluster.group import TrainerGroup

        cpus = (os.cpu_count() or 1) / trainers  # the same cores in total as the plain loop
        self.group = TrainerGroup(trainers, cpus_per_trainer=cpus, name_prefix=f"bench-{strategy}{trainers}")
        self.info = self.group.setup(_job(args, strategy, trainers, total=10 ** 6))

    def run(self, n: int) -> tuple[list[float], list[float]]:
        rates, inner = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            m = self.group.train_step()
            wall = time.perf_counter() - t0
            rates.append(m["perf/tokens_per_s"] * m["perf/step_time"] / wall)
            inner.append(m["perf/tokens_per_s"])
        return rates, inner

    def close(self) -> list[float]:
        peaks = self.group.peak_memory_mb()
        self.group.shutdown()
        return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", default=None, help="HF model dir (default: the tiny preset)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "micro"])
    ap.add_argument("--batch_size", type=int, default=8, help="micro-batch per process")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=6, help="round-robin rounds over all runs")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--max_len", type=int, default=256)
    ap.add_argument("--out", default="bench/train.json")
    args = ap.parse_args()

    from coati_ray.cli import setup_logging
    from coati_ray.cluster.ray_env import init_ray

    setup_logging()
    _job(args, "ddp", 1)  # builds the defaults once, before any process races to
    runners = {"plain PyTorch loop (1 process)": Plain(args)}
    init_ray(None, num_cpus=8)  # logical CPUs: all groups stay up, only one runs at a time
    for strategy in ("ddp", "fsdp"):
        for n in (1, 2):
            note = " (1 rank: unwrapped)" if n == 1 and strategy == "fsdp" else ""
            runners[f"coati_ray {strategy}, {n} trainer{'s' if n > 1 else ''}{note}"] = Trainers(args, strategy, n)
    for r in runners.values():
        r.run(args.warmup)
    samples = {k: ([], []) for k in runners}
    names = list(runners)
    per_round = max(1, args.steps // args.rounds)
    for rnd in range(args.rounds):  # round-robin, rotating who goes first
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            a, b = runners[name].run(per_round)
            samples[name][0].extend(a)
            samples[name][1].extend(b)
    rows = {}
    for name, r in runners.items():
        rows[name] = {"tokens_per_s": statistics.median(samples[name][0]),
                      "in_worker_tokens_per_s": statistics.median(samples[name][1]),
                      "steps": len(samples[name][0]), "peak_mb": r.close()}
    base = rows["plain PyTorch loop (1 process)"]["tokens_per_s"]
    print(f"\nSFT throughput, {args.size} model, micro-batch {args.batch_size}, {os.cpu_count()} CPU cores, "
          f"median of {args.steps} steps each, in {args.rounds} interleaved rounds")
    print("tokens/s at the driver (Ray calls included); in-worker = the step alone")
    print(f"{'run':<46} {'tokens/s':>9} {'vs plain':>9} {'in-worker':>10} {'peak MB per process':>20}")
    for name, r in rows.items():
        r["ratio_vs_plain"] = r["tokens_per_s"] / base
        peaks = ", ".join(f"{m:.0f}" for m in r["peak_mb"])
        inner = f"{r['in_worker_tokens_per_s']:.0f}" if not name.startswith("plain") else "-"
        print(f"{name:<46} {r['tokens_per_s']:>9.0f} {r['ratio_vs_plain']:>9.2f} {inner:>10} {peaks:>20}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "cpu_count": os.cpu_count(), "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
