"""Stage 1: supervised fine-tuning on Ray trainer actors.

    python launchers/train_sft.py                                   # tiny model, demo data, local Ray
    python launchers/train_sft.py --pretrain /models/llama-7b --dataset alpaca.json \
        --strategy fsdp --trainers 4 --batch_size 4 --accumulation_steps 8 --lr 2e-5 --save_path out/sft

Flags: `python launchers/train_sft.py --help`.
"""

import sys

from coati_ray.cli import finish, parse, run_main, setup_logging
from coati_ray.config import ClusterArgs, ModelArgs, SFTDataArgs, TrainArgs


def main(argv=None):
    setup_logging()
    (model, data, train, cluster), extra = parse([ModelArgs, SFTDataArgs, TrainArgs, ClusterArgs], argv,
                                                 "Stage 1 (SFT) of coati_ray.", local_flag=True)
    from coati_ray.pipelines.supervised import run_training

    result = run_training("sft", model, data, train, cluster, local=extra.local)
    print(f"SFT done: {result.history[-1]['train/loss'] if result.history else float('nan'):.4f} final train loss, "
          f"eval loss {result.final_eval.get('eval/loss', float('nan')):.4f}; model saved to {result.save_path}")
    return result


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
    finish()
