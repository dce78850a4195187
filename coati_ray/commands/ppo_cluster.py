"""Stage 3: PPO (+PTX) with generator, reference, reward, critic and trainer actors on Ray.

    python launchers/ppo_cluster.py                       # embedded defaults: tiny demo SFT + RM, local Ray
    python launchers/ppo_cluster.py prompts.csv --pretrain out/sft --rm_path out/rm \\
        --actors 8 --trainers 4 --strategy fsdp --experience_batch_size 64 --train_batch_size 8 \\
        --max_epochs 1 --lr 1e-6 --critic_lr 9e-6 --kl_coef 0.05 --save_path out/ppo
    python launchers/ppo_cluster.py --address auto ...    # join a running cluster (or set RAY_ADDRESS)
    python launchers/ppo_cluster.py ... --resume          # continue from out/ppo/checkpoints/step_N

Flags: `python launchers/ppo_cluster.py --help`.
"""

import sys

from coati_ray.cli import finish, parse, run_main, setup_logging
from coati_ray.errors import ConfigError
from coati_ray.ppo_config import PARTS, PPOConfig


def main(argv=None):
    setup_logging()
    parts, extra = parse(list(PARTS.values()), argv, "Stage 3 (PPO + PTX) of coati_ray.",
                         positional=[("prompts", "Prompts file (same as --prompt_dataset).")])
    cfg = PPOConfig(**dict(zip(PARTS, parts)))
    if extra.prompts:
        if cfg.run.prompt_dataset and cfg.run.prompt_dataset != extra.prompts:
            raise ConfigError("prompt_dataset", f"given twice: {extra.prompts} and --prompt_dataset "
                              f"{cfg.run.prompt_dataset}")
        cfg.run.prompt_dataset = extra.prompts
    from coati_ray.pipelines.ppo import run_ppo

    result = run_ppo(cfg)
    h = result.history
    if h:
        print(f"PPO done: {len(h)} steps, reward {h[0]['reward/mean']:.3f} -> {h[-1]['reward/mean']:.3f}; "
              f"policy saved to {result.save_path}")
    return result


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
    finish()
