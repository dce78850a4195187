#!/usr/bin/env python
"""The whole pipeline on the embedded defaults (tiny llama, bilingual demo data, local Ray).

    python launchers/demo.py                       # SFT -> reward model -> PPO, then gold scores
    python launchers/demo.py --actors 2 --trainers 2 --out outputs/demo2
    python launchers/demo.py --address auto        # on a running Ray cluster
"""

import argparse
import sys

from coati_ray.cli import run_main, setup_logging


def main(argv=None):
    from coati_ray.pipelines.demo import DemoArgs, run_demo

    d = DemoArgs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=d.out, help="output directory (sft/, rm/, demo_summary.json)")
    ap.add_argument("--preset_size", default=d.preset_size, choices=["tiny", "micro"])
    ap.add_argument("--trainers", type=int, default=d.trainers)
    ap.add_argument("--actors", type=int, default=d.actors, help="PPO generator actors")
    ap.add_argument("--strategy", default=d.strategy)
    ap.add_argument("--sft_epochs", type=int, default=d.sft_epochs)
    ap.add_argument("--rm_epochs", type=int, default=d.rm_epochs)
    ap.add_argument("--ppo_steps", type=int, default=d.ppo_steps)
    ap.add_argument("--ppo_lr", type=float, default=d.ppo_lr)
    ap.add_argument("--critic_lr", type=float, default=d.critic_lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--sft_lr", type=float, default=d.sft_lr)
    ap.add_argument("--rm_lr", type=float, default=d.rm_lr)
    ap.add_argument("--batch_size", type=int, default=d.batch_size)
    ap.add_argument("--eval_prompts", type=int, default=d.eval_prompts)
    ap.add_argument("--address", default=None, help="Ray cluster to join (default: embedded local Ray)")
    args = ap.parse_args(argv)
    setup_logging()
    s = run_demo(DemoArgs(**vars(args)))
    print("\n=== coati_ray demo: SFT -> RM -> PPO on the bilingual arithmetic task ===")
    print(f"SFT    train loss {s['sft']['first_train_loss']:.3f} -> eval loss {s['sft']['eval_loss']:.3f}"
          f"   ({s['sft']['seconds']:.0f} s)")
    print(f"RM     held-out accuracy {s['rm']['eval_accuracy']:.3f}, mean margin {s['rm']['eval_margin']:.2f}"
          f"   ({s['rm']['seconds']:.0f} s)")
    print(f"PPO    {s['ppo']['steps']} steps, reward {s['ppo']['reward_first5']:.3f} -> {s['ppo']['reward_last5']:.3f} "
          f"(mean of first / last 5 steps)   ({s['ppo']['seconds']:.0f} s)")
    print(f"gold   score on {s['gold']['prompts']} held-out prompts: SFT {s['gold']['sft']:.3f}, "
          f"PPO {s['gold']['ppo']:.3f}   (right sums, final answer stated or not: "
          f"SFT {s['gold']['arithmetic']['sft']:.3f}, PPO {s['gold']['arithmetic']['ppo']:.3f})")
    for ex in s["gold"]["examples"]:
        print(f"  {ex['prompt']}\n      SFT [{ex['sft_score']:.0f}] {ex['sft']}\n      PPO [{ex['ppo_score']:.0f}] {ex['ppo']}")
    print(f"total {s['seconds']:.0f} s; summary in {args.out}/demo_summary.json")
    return s


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
