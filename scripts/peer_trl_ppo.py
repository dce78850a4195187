#!/usr/bin/env python
"""TRL 1.12's PPOTrainer (`trl.experimental.ppo`) on coati_ray's tiny presets: the peer that
scripts/bench_peer.py compares coati_ray with, on identical work. Runs in its own environment:

    bash scripts/setup_peer.sh
    .venv-peer/bin/python scripts/peer_trl_ppo.py --steps 7 --prompts_per_step 16 --new_tokens 48 --preset tiny
    .venv-peer/bin/python scripts/peer_trl_ppo.py --steps 3 --prompts_per_step 4 --new_tokens 8 --preset micro \\
        --json bench/peer_micro.json

The work: the policy is coati_ray's preset llama directory (`resolve_model_path(None, "auto", preset)`),
the reward and value models are `AutoModelForSequenceClassification(num_labels=1)` from the same
directory (new heads from the seed); the prompts are the first steps x prompts_per_step single-turn
string prompts of the demo `prompts_train.jsonl`, rendered with the tokenizer's chat template and
tokenized exactly as coati_ray's generator does, taken in file order (step s gets rows
s*P .. s*P+P-1; TRL's own loader would shuffle them). PPO: 1 epoch, 1 minibatch of all P samples,
fp32, GAE (gamma 1, lambda 0.95), k1 KL 0.05, clip 0.2 / value clip 0.2, temperature 1, one AdamW
over policy + value head (TRL's design), no gradient checkpointing, no evaluation or sample tables.

Exactly --new_tokens per response: TRL samples `response_length` new tokens (max_new_tokens) and
stops early only at `stop_token`/`stop_token_id`; with both None the policy's generation_config
loses its eos_token_id, so nothing stops a row, no response is truncated and `missing_eos_penalty`
(None) never applies. TRL ends a response at its first pad token, though, and the preset's pad
(id 0) is an ordinary token the model can sample (vocab 1020), so the tokenizer gets a new pad
token whose id equals the vocabulary size: no model can sample it, and TRL replaces pads by 0
before every forward pass, so it never reaches an embedding. Each step's responses are checked
(shape, and their length by TRL's own rule: up to the first pad) and the result is printed.

Output: one JSON line per step (wall time, generate time, response lengths, prompt digest), then a
summary line: samples/s and generated tokens/s over steps 2..N, setup / train / whole-run time,
peak RSS, and whether every response had exactly --new_tokens tokens (exit status 1 if not).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the whole run is timed from here (before the heavy imports)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_LEN = 512  # coati_ray's default --max_len: a prompt keeps its last max(8, MAX_LEN - new_tokens) tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TRL 1.12's PPOTrainer on coati_ray's presets (the peer of "
                                "scripts/bench_peer.py); run with .venv-peer/bin/python.")
    p.add_argument("--steps", type=int, default=7, help="PPO steps (rollout + 1 update each); default 7")
    p.add_argument("--prompts_per_step", type=int, default=16, help="prompts (= samples) per step; default 16")
    p.add_argument("--new_tokens", type=int, default=48, help="exact number of sampled tokens per response")
    p.add_argument("--preset", choices=("tiny", "micro"), default="tiny", help="coati_ray's llama preset")
    p.add_argument("--model_dir", help="the policy's HF directory instead of --preset (scripts/bench_peer.py "
                   "builds one per variant)")
    p.add_argument("--reward_dir", help="reward and value models start from this directory (a sequence "
                   "classifier, num_labels=1) instead of new heads on the policy's")
    p.add_argument("--seed", type=int, default=42, help="seed of the value/reward heads and the sampling")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (coati_ray's preset PPO lr)")
    p.add_argument("--json", metavar="PATH", help="also write every step and the summary (and the prompt ids) here")
    args = p.parse_args(argv)
    for name in ("steps", "prompts_per_step", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def load_prompts(tokenizer: Any, n: int, new_tokens: int) -> list[list[int]]:
    """Token ids of the first n single-turn string prompts (cycled if the file has fewer)."""
    from coati_ray.data.formatting import render_prompt
    from coati_ray.defaults import demo_file

    with open(demo_file("prompts_train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    texts = [r["prompt"] for r in rows if isinstance(r.get("prompt"), str)]
    keep = max(8, MAX_LEN - new_tokens)
    ids = [tokenizer(render_prompt(tokenizer, t), add_special_tokens=False)["input_ids"][-keep:] for t in texts]
    return [ids[i % len(ids)] for i in range(n)]


def digest(prompts: list[list[int]]) -> str:
    return hashlib.sha1(json.dumps(prompts).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import contextlib
    import os
    import resource
    import shutil
    import tempfile

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we know PPOTrainer lives in trl.experimental
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from coati_ray.models.loading import load_causal_lm, load_tokenizer, load_value_model, resolve_model_path

    transformers.logging.set_verbosity_error()
    P, K, N = args.prompts_per_step, args.new_tokens, args.steps
    path = args.model_dir or resolve_model_path(None, "auto", args.preset)
    tok = load_tokenizer(path)
    prompts = load_prompts(tok, N * P, K)  # before the pad changes: the ids coati_ray's generator sees
    torch.manual_seed(args.seed)
    policy = load_causal_lm(path, dtype="fp32")
    reward = load_value_model(args.reward_dir or path, dtype="fp32", pad_token_id=tok.pad_token_id)
    value = load_value_model(args.reward_dir or path, dtype="fp32", pad_token_id=tok.pad_token_id)
    vocab = policy.config.vocab_size
    tok.add_special_tokens({"pad_token": "<|peer_pad|>"})
    if tok.pad_token_id != vocab:
        raise SystemExit(f"the new pad token got id {tok.pad_token_id}, expected the vocabulary size {vocab}")
    tok.padding_side = "left"  # TRL generates from left-padded queries
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("policy", policy), ("reward", reward), ("value", value))}

    out_dir = tempfile.mkdtemp(prefix="peer-trl-ppo-")
    config = PPOConfig(
        output_dir=out_dir, seed=args.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, num_sample_generations=0,
        per_device_train_batch_size=P, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=N * P, local_rollout_forward_batch_size=P, learning_rate=args.lr,
        response_length=K, stop_token=None, stop_token_id=None, missing_eos_penalty=None, temperature=1.0,
        kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
        whiten_rewards=False)
    dataset = Dataset.from_dict({"input_ids": prompts})
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=dataset, eval_dataset=dataset.select(range(P)))
    collator = DataCollatorWithPadding(tok)
    trainer.dataloader = trainer.accelerator.prepare(  # file order instead of TRL's shuffle
        DataLoader(dataset, batch_size=P, shuffle=False, collate_fn=collator, drop_last=True))
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)  # stdout carries our JSON lines only

    gens: list[dict[str, Any]] = []
    original = trl_ppo.batch_generation

    def recorded(model, queries, batch, pad_token_id, generation_config):  # same call, timed and checked
        t = time.perf_counter()
        qr, logits = original(model, queries, batch, pad_token_id, generation_config)
        resp = qr[:, queries.shape[1]:]
        is_pad = torch.cat([resp == tok.pad_token_id, torch.ones_like(resp[:, :1], dtype=torch.bool)], 1)
        lengths = is_pad.int().argmax(1)  # TRL's rule: a response ends at its first pad
        gens.append({"generate_s": time.perf_counter() - t, "width": resp.shape[1], "lengths": lengths.tolist(),
                     "eos": int((resp == tok.eos_token_id).sum())})
        return qr, logits

    trl_ppo.batch_generation = recorded
    steps: list[dict[str, Any]] = []
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    json_out = open(args.json, "w", encoding="utf-8") if args.json else None
    stdout = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        line = json.dumps(obj)
        print(line, file=stdout, flush=True)
        if json_out:
            json_out.write(line + "\n")

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.t = 0.0
            self.metrics: dict[str, float] = {}

        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            self.t = time.perf_counter()

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict | None = None, **kw: Any) -> None:
            self.metrics = dict(logs or {})

        def on_step_end(self, _args: Any, state: Any, *a: Any, **kw: Any) -> None:
            now, g = time.perf_counter(), gens[-1]
            i = len(steps)
            exact = g["width"] == K and all(n == K for n in g["lengths"])
            steps.append({"step": i + 1, "wall_s": round(now - self.t, 4), "generate_s": round(g["generate_s"], 4),
                          "samples": P, "response_tokens_min": min(g["lengths"]),
                          "response_tokens_max": max(g["lengths"]),
                          "exact": exact, "eos_tokens": g["eos"], "prompt_sha1": digest(prompts[i * P:(i + 1) * P]),
                          "score": round(self.metrics.get("objective/scores", float("nan")), 5),
                          "kl": round(self.metrics.get("objective/kl", float("nan")), 5)})
            emit(steps[-1])
            self.t = time.perf_counter()

    clock = StepClock()
    trainer.add_callback(clock)
    t_setup = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints "===training policy===": keep stdout JSON
        trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    t_end = time.perf_counter()

    timed = steps[1:] or steps  # steps 2..N (all of them when N == 1)
    secs = sum(s["wall_s"] for s in timed)
    exact = len(steps) == N and all(s["exact"] for s in steps)
    summary = {
        "summary": True, "peer": "trl.experimental.ppo.PPOTrainer", "preset": args.preset, "steps": N,
        "prompts_per_step": P, "new_tokens": K, "seed": args.seed,
        "timed_steps": f"{timed[0]['step']}..{timed[-1]['step']}",
        "samples_per_s": round(len(timed) * P / secs, 3), "tokens_per_s": round(len(timed) * P * K / secs, 1),
        "step_s": [s["wall_s"] for s in steps], "setup_s": round(t_setup - T0, 3), "train_s": round(t_end - t_setup, 3),
        "run_s": round(time.perf_counter() - T0, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "all_responses_exact": exact, "responses": sum(len(g["lengths"]) for g in gens), "params": params,
        "prompts_sha1": digest(prompts), "torch_threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }
    emit(summary)
    if json_out:
        json_out.write(json.dumps({"prompt_ids": prompts}) + "\n")
        json_out.close()
    if not exact:
        print(f"not every response had exactly {K} tokens", file=sys.stderr)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
