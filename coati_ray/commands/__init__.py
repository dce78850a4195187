"""The `coati` command: one sub-command per launcher, so a `pip install coati_ray` needs no clone.

    coati sft ...        stage 1 (launchers/train_sft.py)
    coati rm ...         stage 2 (launchers/train_reward_model.py)
    coati dpo ...        DPO and its family (launchers/train_dpo.py)
    coati ppo ...        stage 3 on Ray actors (launchers/ppo_cluster.py)
    coati serve ...      the OpenAI-compatible server and chat page (launchers/serve.py)
    coati demo ...       the whole pipeline on the embedded defaults (launchers/demo.py)
    coati control ...    scale, stop or inspect a running PPO job (launchers/control.py)
    coati report DIR     a run's curves as DIR/report.png and report.html
    coati prometheus     Prometheus over the Ray cluster's metrics (ray_coati_*)

Each sub-command is its module here run as a program: the same flags, `--help`, `--config` and
errors as the launcher of that name, which is a two-line wrapper of it.
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {  # sub-command -> (module, what it does)
    "sft": ("train_sft", "stage 1: supervised fine-tuning"),
    "rm": ("train_reward_model", "stage 2: the reward model"),
    "dpo": ("train_dpo", "preference optimization: DPO, IPO, SimPO, ORPO, KTO"),
    "ppo": ("ppo_cluster", "stage 3: PPO (+PTX) on Ray actors"),
    "serve": ("serve", "the OpenAI-compatible server and chat page"),
    "demo": ("demo", "SFT -> RM -> PPO on the embedded defaults, then gold scores"),
    "control": ("control", "scale, stop or inspect a running PPO job"),
    "report": ("report", "plot a run's curves into RUN_DIR/report.png and report.html"),
    "prometheus": ("prometheus", "run Prometheus over the Ray cluster's metrics (ray_coati_*)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: coati COMMAND [flags]   (coati COMMAND --help: its flags)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"coati: error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv = [f"coati {name}", *rest]  # argparse's usage lines name the sub-command
    runpy.run_module(f"coati_ray.commands.{COMMANDS[name][0]}", run_name="__main__")
    return 0
