#!/usr/bin/env python
"""Reward throughput of one reward actor, per reward source, on identical batches (in-process, no Ray).

  fn         a Python function file (`--reward_fn rewards.py:score`: a length and keyword score)
  math       the math verifier (math-verify) on "... #### N" responses against the rows' `answer`
  demo       the demo task's gold scorer
  remote x1  scripts/reward_server.py serving the same function file, over HTTP on 127.0.0.1,
  remote x4    the batch cut into 1 or 4 requests sent at once (`--reward_max_inflight`)
  rm         the tiny preset as a reward model (a new scalar head) on the tokenized prompt + response

    python scripts/bench_rewards.py                        # under a minute on 2 cores
    python scripts/bench_rewards.py --batch_size 256 --skip rm,remote

Every source scores the same batch: demo prompts with their `answer` column, every other response
wrong. Each source gets its own `RewardWorker` (1 torch thread), and `worker.score(exp, batch)` is
timed. The sources take turns in --rounds rounds (rotating who goes first), so machine noise hits
them alike; in a round each source repeats the call until --min_time_s has passed. Reports the
median over rounds of samples/s and ms per batch. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = ("fn", "math", "demo", "remote", "rm")

REWARD_FILE = '''"""A small reward function: a length score and a keyword bonus."""

KEYWORDS = ("answer", "答案", "=")


def score(prompts, responses, **columns):
    out = []
    for r in responses:
        s = min(len(r), 200) / 200
        s += sum(0.5 for k in KEYWORDS if k in r)
        out.append(s)
    return out
'''


def make_batch(n: int):
    """n demo prompts (cycled from prompts_train.jsonl) with a worked response each: the right
    answer for even rows, the answer + 1 for odd ones, stated as "The answer is N" and "#### N"."""
    from coati_ray.data.demo import solution, solve
    from coati_ray.defaults import demo_file
    from coati_ray.rewards.functions import RewardBatch

    rows = [json.loads(line) for line in Path(demo_file("prompts_train.jsonl")).read_text().splitlines() if line]
    rows = [r for r in rows if solve(r["prompt"]) is not None]
    prompts, responses, answers = [], [], []
    for i in range(n):
        row = rows[i % len(rows)]
        p = solve(row["prompt"])
        given = p.answer if i % 2 == 0 else p.answer + 1
        prompts.append(row["prompt"])
        responses.append(f"{solution(p, answer=given)}\n#### {given}")
        answers.append(row["answer"])
    return RewardBatch(prompts, responses, {"answer": answers}, list(range(n)))


def make_experience(batch, model_dir: str):
    """The batch tokenized as a rollout: left-padded prompt (chat template) | response + EOS, right-padded."""
    import torch

    from coati_ray.data.formatting import render_prompt
    from coati_ray.experience import Experience
    from coati_ray.models.loading import load_tokenizer

    tok = load_tokenizer(model_dir)
    prompts = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in batch.prompts]
    answers = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in batch.responses]
    B, P, A = len(prompts), max(map(len, prompts)), max(map(len, answers))
    seq = torch.full((B, P + A), tok.pad_token_id, dtype=torch.long)
    mask, amask = torch.zeros_like(seq), torch.zeros(B, A)
    for i, (p, r) in enumerate(zip(prompts, answers)):
        seq[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p), 1
        seq[i, P:P + len(r)], mask[i, P:P + len(r)] = torch.tensor(r), 1
        amask[i, :len(r)] = 1
    z = torch.zeros(B)
    exp = Experience(seq, mask, amask, torch.zeros(B, A), z, torch.arange(B), z.long(), z.long())
    return exp, {"prompt_tokens": P, "response_tokens": A, "tokens": int(mask.sum())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/reward_server.py in a subprocess on 127.0.0.1, up once /health answers."""

    def __init__(self, reward_fn: str, log: Path, timeout_s: float):
        import requests

        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "reward_server.py"), "--reward_fn",
                                          reward_fn, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                         stdout=f, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reward_server.py exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                if requests.get(self.base + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - t0 > timeout_s:
                self.close()
                raise RuntimeError(f"reward_server.py did not answer /health within {timeout_s:g} s:\n{self._tail()}")
            time.sleep(0.2)
        self.start_s = time.perf_counter() - t0

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def timed(worker, exp, batch, min_time_s: float) -> tuple[float, int]:
    """(seconds per call, calls): worker.score repeated until min_time_s has passed."""
    calls, t0 = 0, time.perf_counter()
    while True:
        worker.score(exp, batch)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time_s:
            return elapsed / calls, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=64, help="samples per scored batch (the same for every source)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all sources; the median is reported")
    ap.add_argument("--min_time_s", type=float, default=1.0,
                    help="in each round, a source repeats its call until this much time has passed")
    ap.add_argument("--size", default="tiny", choices=["tiny", "micro"], help="preset whose model is the reward model")
    ap.add_argument("--skip", default="", help=f"sources to skip, comma-separated, of: {','.join(SOURCES)}")
    ap.add_argument("--server_timeout_s", type=float, default=60.0,
                    help="how long to wait for the reward server's /health before giving up")
    ap.add_argument("--out", default="bench/rewards.json", help="where the JSON with every number goes")
    args = ap.parse_args()
    skip = set(args.skip.split(",")) - {""}
    if skip - set(SOURCES):
        ap.error(f"--skip: unknown source(s) {', '.join(sorted(skip - set(SOURCES)))}; choose from {SOURCES}")
    wall0 = time.perf_counter()

    import torch

    from coati_ray.cli import setup_logging
    from coati_ray.defaults import default_model_dir
    from coati_ray.rewards.sources import RemoteOptions, reward_specs
    from coati_ray.workers.reward import RewardWorker

    setup_logging()
    torch.manual_seed(0)  # the reward model's new head
    model_dir = str(default_model_dir("llama", args.size))
    batch = make_batch(args.batch_size)
    exp, shape = make_experience(batch, model_dir)
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        fn_file = Path(tmp) / "rewards.py"
        fn_file.write_text(REWARD_FILE)
        fn_spec = f"{fn_file}:score"
        plans: dict[str, tuple[str, list, RemoteOptions | None]] = {}
        if "fn" not in skip:
            plans["fn"] = ("Python function file, in the actor", reward_specs(None, fn_spec, None, None), None)
        if "math" not in skip:
            plans["math"] = ("math verifier (math-verify)", reward_specs(None, "math", None, None), None)
        if "demo" not in skip:
            plans["demo"] = ("demo verifier (gold scorer)", reward_specs(None, "demo", None, None), None)
        try:
            if "remote" not in skip:
                server = Server(fn_spec, Path(tmp) / "server.log", args.server_timeout_s)
                for k in (1, 4):
                    plans[f"remote x{k}"] = (f"reward server, same function, max_inflight {k}",
                                             reward_specs(None, None, server.base + "/score", None),
                                             RemoteOptions(max_inflight=k))
            if "rm" not in skip:
                plans["rm"] = (f"reward model ({args.size} preset, fp32)", reward_specs(model_dir, None, None, None),
                               None)
            workers, results = {}, {}
            for name, (what, specs, remote) in plans.items():
                t0 = time.perf_counter()
                workers[name] = RewardWorker(specs, num_threads=1, remote=remote)
                start_s = time.perf_counter() - t0
                scores = workers[name].score(exp, batch)  # warm-up, and a check of what it returns
                (out,) = scores.values()
                assert out.shape == (args.batch_size,) and torch.isfinite(out).all(), (name, out)
                results[name] = {"what": what, "source": specs[0].name, "start_s": start_s,
                                 "mean_score": float(out.mean()), "round_s_per_batch": [], "round_calls": []}
            names = list(workers)
            for rnd in range(args.rounds):  # round-robin, rotating who goes first
                for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                    per_call, calls = timed(workers[name], exp, batch, args.min_time_s)
                    results[name]["round_s_per_batch"].append(per_call)
                    results[name]["round_calls"].append(calls)
        finally:
            if server is not None:
                server.close()
    for r in results.values():
        s = statistics.median(r["round_s_per_batch"])
        r["ms_per_batch"] = s * 1e3
        r["samples_per_s"] = args.batch_size / s
    print(f"\nreward throughput of one RewardWorker (in-process, 1 torch thread), batch of {args.batch_size} samples "
          f"({shape['prompt_tokens']} prompt + {shape['response_tokens']} response token columns), "
          f"{os.cpu_count()} CPU cores, median of {args.rounds} interleaved rounds")
    print("| source | what | samples/s | ms per batch | mean score |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['what']} | {r['samples_per_s']:,.0f} | {r['ms_per_batch']:.2f} | {r['mean_score']:.3f} |")
    wall = time.perf_counter() - wall0
    extra = {"server_start_s": server.start_s} if server is not None else {}
    print(f"\n{'reward server up in %.1f s; ' % server.start_s if server else ''}whole run {wall:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "cpu_count": os.cpu_count(), "torch_threads": 1,
                                          "batch": shape, **extra, "wall_s": wall, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
