"""Offline preference optimization (DPO, IPO, SimPO, ORPO, KTO) on Ray trainer actors, no reward model.

    python launchers/train_dpo.py                                   # demo SFT policy, demo pairs, local Ray
    python launchers/train_dpo.py --pretrain out/sft --dataset pairs.jsonl --loss dpo --beta 0.1 \
        --trainers 2 --strategy fsdp --lora_rank 8 --save_path out/dpo
    python launchers/train_dpo.py --pretrain out/sft --loss kto --dataset feedback_kto.jsonl

Pairs are rows of prompt / chosen / rejected (text or messages) or TRL's implicit-prompt conversations;
KTO reads prompt / completion / label rows. Without --pretrain it starts from the demo SFT policy (trained
once into the cache). Flags: `python launchers/train_dpo.py --help`.
"""

import sys

from coati_ray.cli import finish, parse, run_main, setup_logging
from coati_ray.config import ClusterArgs, ModelArgs, PreferenceArgs, PreferenceDataArgs, TrainArgs


def main(argv=None):
    setup_logging()
    (model, data, train, cluster, pref), extra = parse(
        [ModelArgs, PreferenceDataArgs, TrainArgs, ClusterArgs, PreferenceArgs], argv,
        "Offline preference optimization (DPO / IPO / SimPO / ORPO / KTO) of coati_ray.", local_flag=True,
        defaults={"save_path": "outputs/dpo"})
    from coati_ray.pipelines.supervised import run_training

    if model.pretrain is None:
        from coati_ray.pipelines.demo_models import ensure_demo_models

        model.pretrain = ensure_demo_models(model.preset_size, cluster)["sft"]
    result = run_training("dpo", model, data, train, cluster, local=extra.local, pref=pref)
    ev = result.final_eval
    print(f"{pref.loss.upper()} done: held-out reward accuracy {ev.get('eval/rewards/accuracy', float('nan')):.3f}, "
          f"margin {ev.get('eval/rewards/margin', float('nan')):.3f}; model saved to {result.save_path}")
    return result


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
    finish()
