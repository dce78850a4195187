"""Stage 2: reward-model training on ranked pairs, on Ray trainer actors.

    python launchers/train_reward_model.py                          # tiny model, demo pairs, local Ray
    python launchers/train_reward_model.py --pretrain out/sft --dataset pairs.jsonl \
        --loss_fn log_exp --trainers 2 --save_path out/rm

Flags: `python launchers/train_reward_model.py --help`.
"""

import sys

from coati_ray.cli import finish, parse, run_main, setup_logging
from coati_ray.config import ClusterArgs, ModelArgs, PairDataArgs, RMArgs, TrainArgs


def main(argv=None):
    setup_logging()
    (model, data, train, cluster, rm), extra = parse([ModelArgs, PairDataArgs, TrainArgs, ClusterArgs, RMArgs], argv,
                                                     "Stage 2 (reward model) of coati_ray.", local_flag=True,
                                                     defaults={"save_path": "outputs/rm"})
    from coati_ray.pipelines.supervised import run_training

    result = run_training("rm", model, data, train, cluster, rm=rm, local=extra.local)
    ev = result.final_eval
    print(f"RM done: held-out accuracy {ev.get('eval/accuracy', float('nan')):.3f}, mean margin "
          f"{ev.get('eval/margin', float('nan')):.3f}; model saved to {result.save_path}")
    return result


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
    finish()
