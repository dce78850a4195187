"""A run's directory (`--save_path`): who owns it, which checkpoints belong to it, how many are kept.

    save_path/run.json                 {"run_id", "stage", "started", "config"}: written when a run starts
    save_path/config.yaml              its configuration as flags (coati_ray/config_file.py): --config takes
                                       it, --resume compares against it
    save_path/checkpoints/step_N/      one resumable checkpoint; its marker file (trainer_state.json for
                                       SFT/RM, ppo_state.json for PPO) is written last and names the run_id
    save_path/checkpoints/step_N.tmp/  a save in progress (or killed midway): never resumed from

A new run refuses a directory that already holds files unless `--resume` continues it or
`--overwrite` replaces it, so two runs never mix: `--resume auto` takes only checkpoints whose
run_id is the directory's own. Ground floor: imports nothing of coati_ray but `errors` and `config_file`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from coati_ray.config_file import check_resumed_config, write_config
from coati_ray.errors import ConfigError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# what --overwrite removes: the previous run's own state (its model files are replaced when the new run saves)
RUN_STATE = ("checkpoints", "tensorboard", "critic", RUN_FILE, "config.yaml", "train_summary.json",
             "ppo_summary.json", "wandb", "mlflow.db", "mlartifacts", "report.png", "report.html")


def check_save_path(save_path: str, resume: str, overwrite: bool) -> None:
    """Before anything starts: a fresh run (`--resume no`) into a directory that holds files is refused."""
    path = Path(save_path)
    if path.exists() and not path.is_dir():
        raise ConfigError("save_path", f"{save_path} is a file; expected a directory (new or of this run)")
    if resume != "no" or overwrite or not path.is_dir():
        return
    held = sorted(p.name for p in path.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise ConfigError("save_path", f"{save_path} already holds files ({shown}); continue that run with "
                          "--resume auto, replace it with --overwrite, or pick another --save_path")


def start_run(save_path: str, stage: str, resume: str, overwrite: bool, config: dict[str, Any]) -> str:
    """Claim `save_path` for this run and return its run_id.

    `--overwrite` first removes the previous run's state (`RUN_STATE`). A resumed run keeps the
    directory's run_id.
    """
    check_save_path(save_path, resume, overwrite)
    path = Path(save_path)
    if overwrite and resume == "no":
        gone = [name for name in RUN_STATE if (path / name).exists()]
        for name in gone:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if gone:
            logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(gone), save_path)
    path.mkdir(parents=True, exist_ok=True)
    previous = run_id_of(save_path)
    if resume != "no" and previous:
        return previous  # check_resume_config ran before anything started
    run_id = uuid.uuid4().hex[:12]
    (path / RUN_FILE).write_text(json.dumps({"run_id": run_id, "stage": stage, "started": time.time(),
                                             "config": config}, indent=1, default=str))
    write_config(save_path, config)
    return run_id


def check_resume_config(save_path: str, resume: str, config: dict[str, Any]) -> None:
    """Before anything starts: a resumed run must train what the run in `save_path` trained
    (coati_ray/config_file.py says what may differ)."""
    if resume != "no" and run_id_of(save_path):
        check_resumed_config(save_path, config)


def run_id_of(save_path: str) -> str | None:
    """The run_id recorded in save_path/run.json (None for a directory of no run, or of an older version)."""
    f = Path(save_path) / RUN_FILE
    try:
        return json.loads(f.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_steps(save_path: str, marker: str) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints under save_path/checkpoints, oldest first."""
    ckpts = Path(save_path) / "checkpoints"
    found = [(int(m.group(1)), p) for p in ckpts.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name))
             and (p / marker).is_file()]
    return sorted(found)


def checkpoint_run_id(ckpt: Path | str, marker: str) -> str | None:
    try:
        return json.loads((Path(ckpt) / marker).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def latest_checkpoint(save_path: str, marker: str = "trainer_state.json") -> str | None:
    """The complete checkpoint of this directory's run with the highest step. A checkpoint that
    names another run (copied in by hand) is skipped with a warning; one without a run_id (written
    before run ids existed) is taken only when the directory has none either."""
    own = run_id_of(save_path)
    for _, p in reversed(checkpoint_steps(save_path, marker)):
        theirs = checkpoint_run_id(p, marker)
        if theirs == own:
            return str(p)
        logger.warning("--resume: skipping %s: it belongs to run %s, %s is run %s", p, theirs, save_path, own)
    return None


def resume_checkpoint(resume: str, save_path: str, marker: str = "trainer_state.json") -> str | None:
    """The checkpoint that --resume names: the latest of this run for 'auto', else the path given."""
    if resume == "auto":
        return latest_checkpoint(save_path, marker)
    if not (Path(resume) / marker).exists():
        raise ConfigError("resume", f"{resume} is not a complete checkpoint (no {marker} in it)")
    return resume


def prune_checkpoints(save_path: str, keep: int, marker: str) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (0: all) and drop unfinished `.tmp` saves; the removed."""
    ckpts = Path(save_path) / "checkpoints"
    removed = [p for p in ckpts.glob("step_*.tmp") if p.is_dir()]
    complete = checkpoint_steps(save_path, marker)
    if keep > 0:
        removed += [p for _, p in complete[:-keep]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
