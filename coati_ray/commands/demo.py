"""The whole pipeline on the embedded defaults (tiny llama, bilingual demo data, local Ray).

    python launchers/demo.py                       # SFT -> reward model -> PPO, then gold scores
    python launchers/demo.py --recipe rlvr         # SFT -> GRPO with the demo verifier as the reward
    python launchers/demo.py --recipe dpo          # SFT -> DPO on the preference pairs (no reward model)
    python launchers/demo.py --actors 2 --trainers 2 --out outputs/demo2
    python launchers/demo.py --address auto        # on a running Ray cluster
"""

import sys

from coati_ray.cli import finish, parse, run_main, setup_logging
from coati_ray.pipelines.demo import DemoArgs, run_demo  # light: heavy modules load inside run_demo


def main(argv=None):
    setup_logging()
    (args,), _ = parse([DemoArgs], argv, __doc__)
    s = run_demo(args)
    stages = {"rlhf": "SFT -> RM -> PPO", "rlvr": "SFT -> GRPO on a verifier", "dapo": "SFT -> DAPO on a verifier",
              "dpo": "SFT -> DPO on the preference pairs"}
    print(f"\n=== coati_ray demo ({args.recipe}): {stages[args.recipe]} on the bilingual arithmetic task ===")
    print(f"SFT    train loss {s['sft']['first_train_loss']:.3f} -> eval loss {s['sft']['eval_loss']:.3f}"
          f"   ({s['sft']['seconds']:.0f} s)")
    final = "dpo" if args.recipe == "dpo" else "ppo"
    if s["rm"]:
        print(f"RM     held-out accuracy {s['rm']['eval_accuracy']:.3f}, mean margin {s['rm']['eval_margin']:.2f}"
              f"   ({s['rm']['seconds']:.0f} s)")
    elif final == "ppo":
        print(f"reward {s['reward']} (no reward model, no critic)")
    if final == "dpo":
        print(f"DPO    {s['dpo']['steps']} steps, held-out reward accuracy {s['dpo']['eval_accuracy']:.3f}, margin "
              f"{s['dpo']['eval_margin']:.3f}   ({s['dpo']['seconds']:.0f} s, of which reference log-probs "
              f"{s['dpo']['reference_seconds']:.0f} s)")
    else:
        print(f"PPO    {s['ppo']['steps']} steps, reward {s['ppo']['reward_first5']:.3f} -> "
              f"{s['ppo']['reward_last5']:.3f} (mean of first / last 5 steps)   ({s['ppo']['seconds']:.0f} s)")
    name = final.upper()
    print(f"gold   score on {s['gold']['prompts']} held-out prompts: SFT {s['gold']['sft']:.3f}, "
          f"{name} {s['gold'][final]:.3f}   (right sums, final answer stated or not: "
          f"SFT {s['gold']['arithmetic']['sft']:.3f}, {name} {s['gold']['arithmetic'][final]:.3f})")
    for ex in s["gold"]["examples"]:
        print(f"  {ex['prompt']}\n      SFT [{ex['sft_score']:.0f}] {ex['sft']}\n"
              f"      {name} [{ex[final + '_score']:.0f}] {ex[final]}")
    print(f"total {s['seconds']:.0f} s; summary in {args.out}/demo_summary.json")
    return s


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
    finish()
