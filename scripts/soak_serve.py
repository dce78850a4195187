#!/usr/bin/env python
"""Soak test of the chat server: mixed streaming and non-streaming clients with random disconnects.

    python scripts/soak_serve.py                                # 16 clients, 120 s, the micro preset
    python scripts/soak_serve.py --clients 32 --seconds 300 --model tiny

Starts `launchers/serve.py` on 127.0.0.1 (a free port, an API key), then `--clients` threads send
requests until `--seconds` pass or `--max_requests` have been sent, each request one of: a chat
completion, a streamed chat completion, a completion (/v1/completions), or a streamed request the
client abandons after its first few chunks (it closes the connection). Every second it samples
the server process's RSS and its /stats. /stats counts the requests the engine has taken into a
batch and the tokens it has generated, so the pending work is derived from it: `waiting` = the
requests accepted (answered 200) minus those the engine has taken, and `generating` = tokens
made since the last sample (a row nobody reads any more still counts here until it is freed).

After the load, it polls /stats until nothing is waiting and no tokens are being made (at most
`--drain_s`), samples RSS once more, prints a table and writes JSON (--out). It exits 1 if any
response is a 5xx, any request fails other than the deliberate disconnects, work is still pending
after the drain, or the RSS grew more than `--max_rss_growth_mb` from after the warm-up to the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("chat", "chat_stream", "completion", "abandon")
PROMPTS = ("What is 2 + 3?", "Tell me a short story about a cat.", "小明有3个苹果，又买了5个。一共有多少个？",
           "List three colours.", "Why is the sky blue?", "Translate 'good morning' into French.")
STAT_KEYS = ("requests", "batches", "tokens", "max_batch")


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (psutil if installed, else /proc/<pid>/status)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Soak:
    """The load on one running server: `run()` returns every figure; `failures(result)` says what broke."""

    def __init__(self, base: str, pid: int, model: str, api_key: str | None = None, clients: int = 16,
                 seconds: float = 120.0, max_requests: int = 100_000, warmup_s: float = 10.0, drain_s: float = 60.0,
                 seed: int = 0, timeout_s: float = 120.0, max_tokens: int = 32):
        if not base.startswith(("http://127.0.0.1:", "http://localhost:")):
            raise ValueError(f"the soak test only talks to 127.0.0.1, not {base}")
        self.base, self.pid, self.model = base, pid, model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.clients, self.seconds, self.max_requests = clients, seconds, max_requests
        self.warmup_s, self.drain_s, self.seed, self.timeout_s = warmup_s, drain_s, seed, timeout_s
        self.max_tokens = max_tokens
        self.lock = threading.Lock()
        self.sent = 0  # requests started (a ticket each: the total stays within max_requests)
        self.refused = 0  # answered with a status other than 200: never reached the engine
        self.in_flight = 0
        self.results: list[dict] = []
        self.samples: list[dict] = []
        self.stop_sampling = threading.Event()

    # ------------------------------------------------------------ the server's side

    def stats(self) -> dict:
        import requests

        r = requests.get(self.base + "/stats", headers=self.headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def sample(self, t0: float, base_stats: dict, last: dict | None) -> dict:
        with self.lock:  # before /stats: a request sent while /stats is answered cannot count as waiting
            accepted, in_flight = self.sent - self.refused, self.in_flight
        s = self.stats()
        row = {"t": round(time.monotonic() - t0, 2), "rss_mb": rss_bytes(self.pid) / 2**20, "in_flight": in_flight,
               **{k: s.get(k, 0) - base_stats.get(k, 0) for k in ("requests", "batches", "tokens")},
               "max_batch": s.get("max_batch", 0)}
        # requests sent and not refused that the engine has not taken into a batch yet (on the wire or queued)
        row["waiting"] = max(0, accepted - row["requests"])
        row["generating"] = row["tokens"] - (last["tokens"] if last else 0)
        for k in ("pending", "queued", "active", "running"):  # a server that reports its own pending work
            if k in s:
                row[f"server_{k}"] = s[k]
        return row

    def sampler(self, t0: float, base_stats: dict) -> None:
        last = None
        while not self.stop_sampling.wait(1.0 if last else 0.0):
            try:
                last = self.sample(t0, base_stats, last)
                self.samples.append(last)
            except Exception as e:  # a /stats failure is an error of the run, recorded, not a crash
                self.samples.append({"t": round(time.monotonic() - t0, 2), "error": repr(e)})
                last = last or {"tokens": 0}

    # ------------------------------------------------------------ the clients

    def take_ticket(self, deadline: float) -> bool:
        with self.lock:
            if self.sent >= self.max_requests or time.monotonic() >= deadline:
                return False
            self.sent += 1
            self.in_flight += 1
            return True

    def one(self, session, rng: random.Random, kind: str) -> dict:
        """One request of `kind`: its latency, time to first text chunk, status and error (if any)."""
        import requests

        prompt = rng.choice(PROMPTS)
        stream = kind in ("chat_stream", "abandon")
        chat = kind != "completion" and not (kind == "abandon" and rng.random() < 0.5)
        max_tokens = 64 if kind == "abandon" else rng.randint(4, self.max_tokens)
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": rng.choice((0.0, 0.7, 1.0)),
                "seed": rng.randrange(2**31), "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        url = self.base + ("/v1/chat/completions" if chat else "/v1/completions")
        out = {"kind": kind, "status": None, "error": None, "latency_s": None, "ttfc_s": None, "tokens": 0}
        t0 = time.perf_counter()
        try:
            with session.post(url, json=body, headers=self.headers, stream=stream,
                              timeout=(10, self.timeout_s)) as r:
                out["status"] = r.status_code
                if r.status_code != 200:
                    out["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                elif not stream:
                    data = r.json()
                    choice = data["choices"][0]
                    if choice.get("finish_reason") not in ("stop", "length"):
                        out["error"] = f"bad finish_reason {choice.get('finish_reason')!r}"
                    out["tokens"] = data["usage"]["completion_tokens"]
                else:
                    self.read_stream(r, out, t0, abandon_after=rng.randint(1, 3) if kind == "abandon" else None)
        except requests.RequestException as e:
            out["error"] = f"{type(e).__name__}: {e}"[:300]
        except (ValueError, KeyError, IndexError, TypeError) as e:  # a body that is not what OpenAI sends
            out["error"] = f"bad body: {type(e).__name__}: {e}"[:300]
        out["latency_s"] = time.perf_counter() - t0
        return out

    @staticmethod
    def read_stream(r, out: dict, t0: float, abandon_after: int | None) -> None:
        texts, finish, done = 0, None, False
        for line in r.iter_lines():
            if not line:
                continue
            if not line.startswith(b"data: "):
                raise ValueError(f"not an SSE data line: {line[:80]!r}")
            payload = line[6:]
            if payload == b"[DONE]":
                done = True
                break
            choice = json.loads(payload)["choices"][0]
            text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
            if text:
                texts += 1
                if out["ttfc_s"] is None:
                    out["ttfc_s"] = time.perf_counter() - t0
            finish = choice.get("finish_reason") or finish
            if abandon_after is not None and texts >= abandon_after:
                out["abandoned"] = True  # leaving the with-block closes the half-read connection
                return
        out["tokens"] = texts
        if abandon_after is None and (not done or finish not in ("stop", "length")):
            out["error"] = f"stream ended without [DONE] or a finish_reason (done={done}, finish={finish!r})"

    def client(self, index: int, deadline: float) -> None:
        import requests

        rng = random.Random(self.seed * 1_000_003 + index)
        with requests.Session() as session:
            while self.take_ticket(deadline):
                res = self.one(session, rng, rng.choice(KINDS))
                with self.lock:
                    self.in_flight -= 1
                    if res["status"] is not None and res["status"] != 200:
                        self.refused += 1
                    self.results.append(res)

    # ------------------------------------------------------------ the run

    def drain(self, t0: float, base_stats: dict) -> tuple[bool, float, dict]:
        """Poll /stats until nothing waits and no token is made between two polls 0.5 s apart, at most
        `drain_s`; (drained, seconds waited, the last sample)."""
        start = time.monotonic()
        deadline = start + self.drain_s
        last = self.sample(t0, base_stats, None)
        while True:
            time.sleep(0.5)
            now = self.sample(t0, base_stats, last)
            self.samples.append(now)
            if now["waiting"] == 0 and now["in_flight"] == 0 and now["generating"] == 0:
                return True, time.monotonic() - start, now
            if time.monotonic() >= deadline:
                return False, time.monotonic() - start, now
            last = now

    def run(self) -> dict:
        base_stats = self.stats()
        t0 = time.monotonic()
        rss_start = rss_bytes(self.pid) / 2**20
        sampler = threading.Thread(target=self.sampler, args=(t0, base_stats), name="sampler", daemon=True)
        sampler.start()
        deadline = t0 + self.seconds
        threads = [threading.Thread(target=self.client, args=(i, deadline), name=f"client-{i}", daemon=True)
                   for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:  # each ends at the deadline plus at most one request's timeout
            t.join(timeout=self.seconds + self.timeout_s + 30)
        stuck = sum(t.is_alive() for t in threads)
        load_s = time.monotonic() - t0
        self.stop_sampling.set()
        sampler.join(timeout=30)
        drained, drain_wait, end = self.drain(t0, base_stats)
        return self.summary(rss_start, end, drained, drain_wait, load_s, stuck)

    def summary(self, rss_start: float, end: dict, drained: bool, drain_wait: float, load_s: float,
                stuck: int) -> dict:
        by_kind: dict[str, dict] = {}
        groups = defaultdict(list)
        for r in self.results:
            groups[r["kind"]].append(r)
        for kind in KINDS:
            rs = groups.get(kind, [])
            lat = [r["latency_s"] for r in rs if not r["error"]]
            ttfc = [r["ttfc_s"] for r in rs if not r["error"] and r["ttfc_s"] is not None]
            by_kind[kind] = {"n": len(rs), "errors": sum(bool(r["error"]) for r in rs),
                             **{f"p{p}_s": percentile(lat, p) for p in (50, 95, 99)},
                             **({f"ttfc_p{p}_s": percentile(ttfc, p) for p in (50, 95, 99)}
                                if kind in ("chat_stream", "abandon") else {})}
        ok = [r["latency_s"] for r in self.results if not r["error"]]
        errors = Counter(str(r["status"]) if r["status"] not in (None, 200) else "client" for r in self.results
                         if r["error"])
        samples = [s for s in self.samples if "error" not in s]
        warm = [s for s in samples if s["t"] >= self.warmup_s] or samples[-1:]
        during = [s for s in samples if s["t"] <= load_s]
        return {
            "base": self.base, "clients": self.clients, "seconds": self.seconds, "max_requests": self.max_requests,
            "warmup_s": self.warmup_s, "load_s": load_s, "requests": len(self.results),
            "requests_per_s": len(self.results) / load_s if load_s else None,
            "abandoned": sum(bool(r.get("abandoned")) for r in self.results),
            "by_kind": by_kind, "errors_by_status": dict(errors),
            "error_examples": [r["error"] for r in self.results if r["error"]][:10],
            "status_5xx": sum(1 for r in self.results if r["status"] is not None and r["status"] >= 500),
            "stats_errors": [s["error"] for s in self.samples if "error" in s][:5],
            "latency_s": {f"p{p}": percentile(ok, p) for p in (50, 95, 99)},
            "ttfc_s": {f"p{p}": percentile([r["ttfc_s"] for r in self.results if not r["error"] and r["ttfc_s"]], p)
                       for p in (50, 95, 99)},
            "rss_mb": {"start": rss_start, "after_warmup": warm[0]["rss_mb"] if warm else rss_start,
                       "max": max([s["rss_mb"] for s in samples] + [end["rss_mb"]]), "end": end["rss_mb"]},
            "pending": {"waiting_max": max((s["waiting"] for s in during), default=0), "waiting_end": end["waiting"],
                        "in_flight_max": max((s["in_flight"] for s in during), default=0),
                        "in_flight_end": end["in_flight"], "generating_end": end["generating"],
                        "drained": drained, "drain_wait_s": drain_wait},
            "server": {k: end.get(k) for k in ("requests", "batches", "tokens", "max_batch")},
            "client_threads_stuck": stuck, "samples": self.samples,
        }


def failures(result: dict, max_rss_growth_mb: float) -> list[str]:
    """What the run broke, in words (empty: it passed)."""
    out = []
    if result["status_5xx"]:
        out.append(f"{result['status_5xx']} responses were 5xx: {result['error_examples'][:3]}")
    other = sum(result["errors_by_status"].values())
    if other:
        out.append(f"{other} requests failed (not counting the deliberate disconnects): "
                   f"{result['errors_by_status']}, e.g. {result['error_examples'][:3]}")
    if result["stats_errors"]:
        out.append(f"/stats failed during the run: {result['stats_errors']}")
    p = result["pending"]
    if not p["drained"] or p["waiting_end"] or p["in_flight_end"]:
        out.append(f"work still pending {p['drain_wait_s']:.1f} s after the load: {p['waiting_end']} requests "
                   f"waiting, {p['in_flight_end']} in flight, {p['generating_end']} tokens made in the last poll")
    growth = result["rss_mb"]["end"] - result["rss_mb"]["after_warmup"]
    if growth > max_rss_growth_mb:
        out.append(f"RSS grew {growth:.0f} MB from after the warm-up to the end (limit {max_rss_growth_mb:.0f} MB)")
    if result["client_threads_stuck"]:
        out.append(f"{result['client_threads_stuck']} client threads did not finish")
    if result["latency_s"]["p95"] is None or not math.isfinite(result["latency_s"]["p95"]):
        out.append("no p95 latency: no request succeeded")
    return out


def table(result: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f}"

    lines = ["| kind | requests | errors | p50 ms | p95 ms | p99 ms | first chunk p50 ms | first chunk p95 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, k in result["by_kind"].items():
        lines.append(f"| {kind} | {k['n']} | {k['errors']} | {ms(k['p50_s'])} | {ms(k['p95_s'])} | {ms(k['p99_s'])} "
                     f"| {ms(k.get('ttfc_p50_s'))} | {ms(k.get('ttfc_p95_s'))} |")
    lat, ttfc = result["latency_s"], result["ttfc_s"]
    lines.append(f"| all | {result['requests']} | {sum(k['errors'] for k in result['by_kind'].values())} "
                 f"| {ms(lat['p50'])} | {ms(lat['p95'])} | {ms(lat['p99'])} | {ms(ttfc['p50'])} | {ms(ttfc['p95'])} |")
    rss, p = result["rss_mb"], result["pending"]
    lines += ["", "| figure | value |", "|---|---|",
              f"| load | {result['clients']} clients, {result['load_s']:.0f} s, {result['requests']} requests "
              f"({result['requests_per_s']:.1f}/s), {result['abandoned']} abandoned mid-stream |",
              f"| errors by status | {result['errors_by_status'] or 'none'} |",
              f"| RSS MB start / after warm-up / max / end | {rss['start']:.0f} / {rss['after_warmup']:.0f} / "
              f"{rss['max']:.0f} / {rss['end']:.0f} |",
              f"| waiting for the engine, max / end | {p['waiting_max']} / {p['waiting_end']} |",
              f"| in flight, max / end | {p['in_flight_max']} / {p['in_flight_end']} |",
              f"| drained | {p['drained']} after {p['drain_wait_s']:.1f} s |",
              f"| engine batches / max batch / tokens | {result['server']['batches']} / "
              f"{result['server']['max_batch']} / {result['server']['tokens']} |"]
    return "\n".join(lines)


def start_server(model: str, api_key: str, log: Path | None = None):
    """`launchers/serve.py` on `model` (a preset name, micro or tiny, or a directory) on 127.0.0.1."""
    sys.path.insert(0, str(ROOT))
    from coati_ray.serve.process import ServerProcess

    if model in ("micro", "tiny"):
        from coati_ray.defaults import default_model_dir

        model = str(default_model_dir("llama", model))
    return ServerProcess(model, "--api_key", api_key, "--served_model_name", "soak", "--host", "127.0.0.1", log=log)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="micro", help="micro, tiny (presets) or an HF model directory")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=120.0, help="how long the clients send requests")
    ap.add_argument("--max_requests", type=int, default=50_000, help="requests sent at most, all clients together")
    ap.add_argument("--warmup_s", type=float, default=10.0, help="RSS growth is measured from this second on")
    ap.add_argument("--drain_s", type=float, default=60.0, help="how long to wait for pending work to end")
    ap.add_argument("--max_tokens", type=int, default=32, help="largest max_tokens of a request (4..this)")
    ap.add_argument("--timeout_s", type=float, default=120.0, help="one request's read timeout")
    ap.add_argument("--max_rss_growth_mb", type=float, default=200.0,
                    help="fail if the server's RSS grows more than this from after the warm-up to the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="the server's output (default: discarded)")
    ap.add_argument("--out", default="bench/soak_serve.json")
    args = ap.parse_args()
    if args.clients < 1 or args.seconds <= 0 or args.max_requests < 1:
        ap.error("--clients, --seconds and --max_requests must be positive")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    key = secrets.token_hex(16)
    with start_server(args.model, key, Path(args.log) if args.log else None) as server:
        result = Soak(server.base, server.proc.pid, "soak", key, args.clients, args.seconds, args.max_requests,
                      args.warmup_s, args.drain_s, args.seed, args.timeout_s, args.max_tokens).run()
    result["args"] = vars(args)
    problems = failures(result, args.max_rss_growth_mb)
    result["failures"] = problems
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
