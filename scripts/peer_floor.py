#!/usr/bin/env python
"""The floor under a PPO step on identical work: the bare model calls of one coati_ray step, in one
process, on all of this machine's cores, with nothing around them (no Ray, no buffer, no losses
beyond a sum, no metrics). scripts/bench_peer.py (`--floor`) runs it beside TRL and coati_ray.

    python scripts/peer_floor.py --model_dir M/policy --reward_dir M/reward --prompts F.jsonl \\
        --steps 7 --prompts_per_step 16 --new_tokens 48

A step's calls, with coati_ray's own functions (packing on, as its default):
    generate    HFBackend.generate: P prompts, exactly K sampled tokens each (EOS ignored)
    reference   action_log_probs of the frozen policy copy
    reward      sequence_reward of the reward model
    values      token_values of the critic (no grad)
    policy      action_log_probs with grad, backward, AdamW step
    critic      token_values with grad, backward, AdamW step
No framework can make the identical work faster than the sum of these, short of faster kernels or
less work. Steps 2..N are timed, as in bench_peer.py; one JSON line per step, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="The bare model calls of coati_ray's PPO step (scripts/bench_peer.py --floor).")
    p.add_argument("--model_dir", required=True, help="the policy's HF directory (also the reference)")
    p.add_argument("--reward_dir", required=True, help="the reward model's directory (also the critic's start)")
    p.add_argument("--prompts", required=True, help="the JSONL prompt file bench_peer.py wrote (its step plan)")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--prompts_per_step", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    args = p.parse_args(argv)

    import torch

    from coati_ray.data.formatting import render_prompt
    from coati_ray.engines.generation import HFBackend, SamplingParams
    from coati_ray.models.heads import action_log_probs, sequence_reward, set_packing, token_values
    from coati_ray.models.loading import load_causal_lm, load_tokenizer, load_value_model
    from coati_ray.workers.chunks import step_prompts

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    P, K, N = args.prompts_per_step, args.new_tokens, args.steps
    tok = load_tokenizer(args.model_dir)
    policy, ref = load_causal_lm(args.model_dir), load_causal_lm(args.model_dir).eval()
    reward, critic = load_value_model(args.reward_dir).eval(), load_value_model(args.reward_dir)
    for m in (policy, ref, reward, critic):
        set_packing(m, True)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=2e-5)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=2e-5)
    backend = HFBackend(policy, tok.eos_token_id, tok.pad_token_id, torch.device("cpu"))
    texts = [json.loads(x)["prompt"] for x in Path(args.prompts).read_text(encoding="utf-8").splitlines() if x.strip()]
    keep = max(8, 512 - K)  # the generator's max_prompt with the default --max_len 512

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    steps = []
    for s in range(N):
        ids = [tok(render_prompt(tok, texts[r]), add_special_tokens=False)["input_ids"][-keep:]
               for r in step_prompts(s, len(texts), P, args.seed)]
        policy.eval()
        out, t_gen = timed(lambda: backend.generate(ids, SamplingParams(max_new_tokens=K, seed=s, ignore_eos=True)))
        L = max(len(x) for x in ids)
        seq = torch.full((P, L + K), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(seq)
        for i, (x, g) in enumerate(zip(ids, out)):
            seq[i, L - len(x):] = torch.tensor(x + g.token_ids)
            mask[i, L - len(x):] = 1
        with torch.no_grad():
            _, t_ref = timed(lambda: action_log_probs(ref, seq, mask, K))
            _, t_rew = timed(lambda: sequence_reward(reward, seq, mask))
            _, t_val = timed(lambda: token_values(critic, seq, mask))

        def update(model, opt, loss_of):
            model.train()
            loss_of(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        _, t_pol = timed(lambda: update(policy, opt_p, lambda m: action_log_probs(m, seq, mask, K).sum()))
        _, t_cri = timed(lambda: update(critic, opt_c, lambda m: token_values(m, seq, mask)[:, -K:].square().sum()))
        calls = {"generate": t_gen, "reference": t_ref, "reward": t_rew, "values": t_val, "policy": t_pol,
                 "critic": t_cri}
        step = {"step": s, "step_s": round(sum(calls.values()), 4), **{k: round(v, 4) for k, v in calls.items()},
                "exact": all(len(g.token_ids) == K for g in out)}
        steps.append(step)
        print(json.dumps(step), flush=True)
    timed_steps = steps[1:] or steps
    secs = sum(x["step_s"] for x in timed_steps)
    share = {k: round(sum(x[k] for x in timed_steps) / secs, 3)
             for k in ("generate", "reference", "reward", "values", "policy", "critic")}
    print(json.dumps({"summary": True, "samples_per_s": round(len(timed_steps) * P / secs, 3),
                      "tokens_per_s": round(len(timed_steps) * P * K / secs, 1), "threads": args.threads,
                      "share": share, "exact": all(x["exact"] for x in steps)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
