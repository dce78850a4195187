#!/usr/bin/env python
"""coati_ray's PPO against TRL 1.12's PPOTrainer on identical work, side by side (issue 18).

    bash scripts/setup_peer.sh                                   # once: .venv-peer with trl 1.12
    python scripts/bench_peer.py                                 # tiny and small variants, 2 rounds each
    python scripts/bench_peer.py --variants tiny --rounds 2 --configs on_policy,staleness1,actors2
    python scripts/bench_peer.py --variants tiny --rounds 1 --out bench/peer_quick.json

The work (both sides): a random llama policy built here from the demo tokenizer (`tiny`: the
preset, ~3.7M parameters; `small`: hidden 512, 16 layers, ~51.6M), a reward model of the same shape
with a seeded scalar head that also starts the value model, P chat-formatted demo prompts per step,
exactly K sampled tokens per response (EOS ignored: coati_ray's --ignore_eos, TRL's stop_token None
with an unsampleable pad), 1 PPO epoch of 1 minibatch, fp32, GAE (gamma 1, lambda 0.95), k1 KL 0.05.
Runs alternate TRL, coati_ray, TRL, coati_ray, ... so that both see the same machine state (coati_ray's
configurations in reverse order every other round).

Checked, and printed: every step of both gets the same prompt token ids (the coati_ray prompts file
is written in the order its seeded step plan reads it, and the ids are recomputed with coati_ray's
own plan and tokenization), and every response of both has exactly K tokens. A run that fails a
check is reported and the script exits 1.

Measured per run: steady samples/s and generated tokens/s over steps 2..N, the whole run's wall
time (process start to exit, start-up and final save included), and the peak PSS of the run's
whole process tree (Ray's daemons and every actor included), sampled with psutil every second and
split by role at coati_ray's peak; coati_ray also reports its start-up timeline (Ray up, actors
started, models loaded, first step). `--floor` adds, each round, the bare model calls of coati_ray's
step in one process on every core (scripts/peer_floor.py): the most any framework could get out of
this machine on this work with these kernels. Prints one table per variant (medians, ratios of medians)
and writes every number to --out. Not part of CI (minutes per run; it needs .venv-peer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coati_ray.testing.memory import TreeMemory  # noqa: E402

VARIANTS = {  # the llama preset (coati_ray/presets.py); prompts per step, new tokens per response, steps
    "tiny": (16, 48, 7),
    "small": (32, 128, 5),
}
# coati_ray configurations: extra flags on top of the shared work
CONFIGS = {
    "on_policy": [],
    "colocated": ["--colocate", "rollout"],
    "hybrid": ["--colocate", "all", "--cpus_per_trainer", "2"],
    "hybrid_lean": ["--colocate", "all", "--cpus_per_trainer", "2", "--no_dashboard"],
    "unpacked": ["--no_packing"],
    "staleness1": ["--max_staleness", "1"],
    "actors2": ["--actors", "2"],
}
SEED = 42
med = statistics.median


# --- the models and prompts ---------------------------------------------------------------------
def build_models(variant: str, out: Path) -> tuple[str, str]:
    """policy/ (the llama preset `variant`, seeded as coati_ray builds its presets) and reward/ (a
    sequence classifier on it, num_labels 1, with a seeded head) for `variant`."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    from coati_ray.defaults import default_model_dir

    policy, reward = out / variant / "policy", out / variant / "reward"
    if (policy / "config.json").exists() and (reward / "config.json").exists():
        return str(policy), str(reward)
    shutil.copytree(default_model_dir("llama", variant), policy, dirs_exist_ok=True)
    torch.manual_seed(SEED + 1)
    rm = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1)
    rm.save_pretrained(str(reward))
    for f in policy.iterdir():  # the tokenizer's files
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, reward / f.name)
    return str(policy), str(reward)


def params_m(path: str, causal: bool) -> float:
    from coati_ray.models.loading import load_causal_lm, load_value_model

    m = load_causal_lm(path) if causal else load_value_model(path)
    return round(sum(p.numel() for p in m.parameters()) / 1e6, 2)


def write_prompt_file(peer_prompts: list[str], out: Path) -> Path:
    """The peer's prompts (step s: rows s*P..s*P+P-1 in order) laid out so that coati_ray's seeded step
    plan (coati_ray/workers/chunks.py) gives step s exactly the same rows."""
    from coati_ray.workers.chunks import _episode_order

    n = len(peer_prompts)
    order = _episode_order(n, SEED, 0)  # the plan's episode 0: step s reads file rows order[s*P:(s+1)*P]
    rows: list[str | None] = [None] * n
    for j, file_row in enumerate(order):
        rows[file_row] = peer_prompts[j]
    out.write_text("".join(json.dumps({"prompt": r}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def peer_prompt_texts(n: int) -> list[str]:
    """The first n single-turn string prompts of the demo file, as scripts/peer_trl_ppo.py takes them."""
    from coati_ray.defaults import demo_file

    with open(demo_file("prompts_train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    texts = [r["prompt"] for r in rows if isinstance(r.get("prompt"), str)]
    return [texts[i % len(texts)] for i in range(n)]


def coati_step_prompt_ids(prompt_file: Path, policy: str, steps: int, P: int, K: int) -> list[list[int]]:
    """The prompt ids coati_ray's generators see, step by step: its plan and its tokenization."""
    from coati_ray.data.formatting import render_prompt
    from coati_ray.models.loading import load_tokenizer
    from coati_ray.workers.chunks import step_prompts

    tok = load_tokenizer(policy)
    texts = [json.loads(line)["prompt"] for line in prompt_file.read_text(encoding="utf-8").splitlines()]
    keep = max(8, 512 - K)  # the generator's max_prompt with the default --max_len 512
    out = []
    for s in range(steps):
        for row in step_prompts(s, len(texts), P, SEED):
            out.append(tok(render_prompt(tok, texts[row]), add_special_tokens=False)["input_ids"][-keep:])
    return out


def run_measured(cmd: list[str], env: dict[str, str], timeout_s: float, log: Path) -> dict[str, Any]:
    """Run `cmd`, returning its wall time, exit code, memory peak and its stdout's JSON lines."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=str(ROOT), text=True)
        mem = TreeMemory(proc.pid)
        mem.start()
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            raise SystemExit(f"{' '.join(cmd[:3])} ... ran past {timeout_s:.0f} s; its log: {log}") from None
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    return {"rc": proc.returncode, "run_s": round(wall, 2), **mem.stop(), "lines": lines, "log": str(log)}


# --- one run of each side -----------------------------------------------------------------------
def run_trl(variant: str, policy: str, reward: str, tmp: Path, r: int, timeout_s: float) -> dict[str, Any]:
    P, K, N = VARIANTS[variant]
    py = ROOT / ".venv-peer" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} is missing: run `bash scripts/setup_peer.sh` first")
    cmd = [str(py), "scripts/peer_trl_ppo.py", "--steps", str(N), "--prompts_per_step", str(P), "--new_tokens", str(K),
           "--model_dir", policy, "--reward_dir", reward, "--seed", str(SEED)]
    out = run_measured(cmd, dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1"), timeout_s, tmp / f"trl-{variant}-{r}.log")
    summary = next((x for x in out.pop("lines") if x.get("summary")), None)
    if out["rc"] != 0 or summary is None:
        raise SystemExit(f"TRL run failed (exit {out['rc']}); its log: {out['log']}")
    return {**out, "samples_per_s": summary["samples_per_s"], "tokens_per_s": summary["tokens_per_s"],
            "exact": summary["all_responses_exact"], "prompts_sha1": summary["prompts_sha1"],
            "step_s": summary["step_s"], "setup_s": summary["setup_s"]}


def run_floor(variant: str, policy: str, reward: str, prompts: Path, tmp: Path, r: int,
              timeout_s: float) -> dict[str, Any]:
    """scripts/peer_floor.py: the bare model calls of coati_ray's step on the same work, in one process."""
    P, K, N = VARIANTS[variant]
    cmd = [sys.executable, "scripts/peer_floor.py", "--model_dir", policy, "--reward_dir", reward, "--prompts",
           str(prompts), "--steps", str(N), "--prompts_per_step", str(P), "--new_tokens", str(K), "--seed", str(SEED)]
    out = run_measured(cmd, dict(os.environ), timeout_s, tmp / f"floor-{variant}-{r}.log")
    summary = next((x for x in out.pop("lines") if x.get("summary")), None)
    if out["rc"] != 0 or summary is None:
        raise SystemExit(f"floor run failed (exit {out['rc']}); its log: {out['log']}")
    return {**out, "samples_per_s": summary["samples_per_s"], "tokens_per_s": summary["tokens_per_s"],
            "exact": summary["exact"], "share": summary["share"]}


def run_coati(variant: str, config: str, policy: str, reward: str, prompts: Path, tmp: Path, r: int,
              timeout_s: float, extra: list[str]) -> dict[str, Any]:
    P, K, N = VARIANTS[variant]
    save = tmp / f"coati-{variant}-{config}-{r}"
    argv = [str(prompts), "--pretrain", policy, "--rm_path", reward, "--experience_batch_size", str(P),
            "--train_batch_size", str(P), "--max_new_tokens", str(K), "--ignore_eos", "--max_steps", str(N),
            "--max_epochs", "1", "--lr", "2e-5", "--critic_lr", "2e-5", "--kl_coef", "0.05", "--seed", str(SEED),
            "--sync_check_interval", "0", "--save_path", str(save), "--overwrite", *CONFIGS[config], *extra]
    cmd = [sys.executable, __file__, "--_coati_child", json.dumps(argv)]
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), TOKENIZERS_PARALLELISM="false")
    out = run_measured(cmd, env, timeout_s, tmp / f"coati-{variant}-{config}-{r}.log")
    res = next((x for x in out.pop("lines") if "history" in x), None)
    if out["rc"] != 0 or res is None:
        raise SystemExit(f"coati_ray run ({config}) failed (exit {out['rc']}); its log: {out['log']}")
    h = res["history"]
    timed = h[1:] or h
    secs = sum(m["timing/step"] for m in timed)
    samples = len(timed) * P
    exact = all(m["response/length"] == K and m["response/finished"] == 0 for m in h) and len(h) == N
    phases = {k: round(sum(m[f"timing/{k}"] for m in timed) / secs, 3)
              for k in ("generate", "score", "values", "train", "sync")}
    return {**out, "samples_per_s": round(samples / secs, 3), "tokens_per_s": round(samples * K / secs, 1),
            "exact": exact, "step_s": [round(m["timing/step"], 3) for m in h], "timeline": res["timeline"],
            "phase_share": phases}


def coati_child(argv: list[str]) -> int:
    """Run launchers/ppo_cluster.py's main in this process and print its history as one JSON line."""
    import logging

    t0 = time.perf_counter()
    from coati_ray.cli import run_main
    from coati_ray.commands.ppo_cluster import main

    result = run_main(lambda: main(argv))
    logging.shutdown()
    timeline = {k: round(v, 2) for k, v in result.timeline.items()}
    timeline["process_import_s"] = round(t0 - T_START, 2)
    print(json.dumps({"history": result.history, "timeline": timeline}), flush=True)
    return 0


# --- the table ----------------------------------------------------------------------------------
def summarize(variant: str, runs: dict[str, list[dict]]) -> dict[str, Any]:
    trl = runs["trl"]
    rows = {}
    for name, rs in runs.items():
        rows[name] = {
            "samples_per_s": med(r["samples_per_s"] for r in rs), "tokens_per_s": med(r["tokens_per_s"] for r in rs),
            "run_s": med(r["run_s"] for r in rs), "peak_pss_mb": med(r["peak_pss_mb"] for r in rs),
            "samples_per_s_each": [r["samples_per_s"] for r in rs], "run_s_each": [r["run_s"] for r in rs],
            "peak_pss_mb_each": [r["peak_pss_mb"] for r in rs]}
        if name != "trl":
            for key in ("samples_per_s", "tokens_per_s"):
                rows[name][f"{key}_ratio"] = round(rows[name][key] / rows["trl"][key], 2)
            for key in ("run_s", "peak_pss_mb"):
                rows[name][f"{key}_ratio"] = round(rows[name][key] / rows["trl"][key], 2)
    return {"variant": variant, "rows": rows, "trl_exact": all(r["exact"] for r in trl)}


def print_table(variant: str, s: dict[str, Any], runs: dict[str, list[dict]]) -> None:
    P, K, N = VARIANTS[variant]
    print(f"\n## {variant}: {P} prompts x {K} tokens per step, {N} steps (2..{N} timed); medians of "
          f"{len(runs['trl'])} interleaved rounds")
    print("| | samples/s | tokens/s | whole run s | peak PSS MB | samples/s ratio | run ratio | PSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in s["rows"].items():
        ratio = (f"{row['samples_per_s_ratio']:.2f}x | {row['run_s_ratio']:.2f}x | {row['peak_pss_mb_ratio']:.2f}x"
                 if name != "trl" else " | | ")
        label = {"trl": "TRL 1.12 PPOTrainer", "floor": "floor: coati_ray's bare model calls"}.get(
            name, f"coati_ray {name}")
        print(f"| {label} | {row['samples_per_s']:.2f} | {row['tokens_per_s']:.0f} | {row['run_s']:.1f} | "
              f"{row['peak_pss_mb']:.0f} | {ratio} |")
    for name, rs in runs.items():
        if name == "floor":
            print(f"  floor: share of the step by call {rs[-1]['share']} (one process, every core, no framework)")
        if name in ("trl", "floor"):
            continue
        last = rs[-1]
        print(f"  coati_ray {name}: start-up timeline (s) {last['timeline']}; step share {last['phase_share']}; "
              f"PSS by role at peak {last['pss_by_role_mb']} ({last['processes_at_peak']} processes)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="tiny,small", help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--configs", default="on_policy", help="coati_ray configurations, of: " + ", ".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (TRL, then each coati_ray config)")
    p.add_argument("--floor", action="store_true", help="also time the bare model calls of coati_ray's step in "
                   "one process (scripts/peer_floor.py) each round: what no framework can beat on this work")
    p.add_argument("--coati_flags", default="", help="extra flags for every coati_ray run (quoted)")
    p.add_argument("--timeout_s", type=float, default=1800.0, help="bound on one run")
    p.add_argument("--out", default="bench/peer.json", help="JSON with every run and the summaries")
    p.add_argument("--workdir", help="models, prompt files and logs (default: a temporary directory)")
    args = p.parse_args(argv)
    for name, known in (("variants", VARIANTS), ("configs", CONFIGS)):
        for v in getattr(args, name).split(","):
            if v not in known:
                p.error(f"--{name}: unknown {v!r}; expected one of {', '.join(known)}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from coati_ray.runtime import quiet_libraries

    quiet_libraries()
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-peer-"))
    tmp.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "variants": {}}
    ok = True
    for variant in args.variants.split(","):
        P, K, N = VARIANTS[variant]
        policy, reward = build_models(variant, tmp / "models")
        texts = peer_prompt_texts(N * P)
        prompts = write_prompt_file(texts, tmp / f"prompts-{variant}.jsonl")
        print(f"{variant}: policy {params_m(policy, True)}M, reward/value {params_m(reward, False)}M parameters; "
              f"workdir {tmp}", flush=True)
        runs: dict[str, list[dict]] = {"trl": [], **({"floor": []} if args.floor else {}),
                                       **{c: [] for c in args.configs.split(",")}}
        for r in range(args.rounds):
            runs["trl"].append(run_trl(variant, policy, reward, tmp, r, args.timeout_s))
            print(f"  round {r + 1} trl: {runs['trl'][-1]['samples_per_s']} samples/s, "
                  f"{runs['trl'][-1]['run_s']} s, {runs['trl'][-1]['peak_pss_mb']:.0f} MB", flush=True)
            if args.floor:
                runs["floor"].append(run_floor(variant, policy, reward, prompts, tmp, r, args.timeout_s))
                print(f"  round {r + 1} floor: {runs['floor'][-1]['samples_per_s']} samples/s", flush=True)
            configs = args.configs.split(",")
            for c in configs if r % 2 == 0 else configs[::-1]:  # alternate the order: no config always runs first
                runs[c].append(run_coati(variant, c, policy, reward, prompts, tmp, r, args.timeout_s,
                                         args.coati_flags.split()))
                print(f"  round {r + 1} coati_ray {c}: {runs[c][-1]['samples_per_s']} samples/s, "
                      f"{runs[c][-1]['run_s']} s, {runs[c][-1]['peak_pss_mb']:.0f} MB", flush=True)
        # identical work: the same prompt ids per step on both sides, exactly K tokens everywhere
        sys.path.insert(0, str(ROOT / "scripts"))
        from peer_trl_ppo import digest, load_prompts  # the peer's own prompt tokenization

        from coati_ray.models.loading import load_tokenizer

        peer_ids = load_prompts(load_tokenizer(policy), N * P, K)
        coati_ids = coati_step_prompt_ids(prompts, policy, N, P, K)
        same_prompts = peer_ids == coati_ids and all(x["prompts_sha1"] == digest(peer_ids) for x in runs["trl"])
        exact = all(x["exact"] for rs in runs.values() for x in rs)
        print(f"identical work: same prompt token ids at every step on both sides: {same_prompts} "
              f"(sha1 {digest(peer_ids)}); every response exactly {K} tokens on both sides: {exact}")
        ok = ok and same_prompts and exact
        s = summarize(variant, runs)
        s.update({"same_prompts": same_prompts, "all_exact": exact, "prompts_sha1": digest(peer_ids),
                  "params_m": {"policy": params_m(policy, True), "reward": params_m(reward, False)}})
        print_table(variant, s, runs)
        report["variants"][variant] = {"summary": s, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return 0 if ok else 1


T_START = time.perf_counter()

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_coati_child":
        from coati_ray.cli import finish

        finish(coati_child(json.loads(sys.argv[2])))  # as launchers/ppo_cluster.py ends
    sys.exit(main())
