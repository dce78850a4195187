"""A run's directory: refusing another run's --save_path, run ids on checkpoints, pruning, killed saves."""

from __future__ import annotations

import json

import pytest

from coati_ray.errors import ConfigError
from coati_ray.run_dir import (
    check_save_path,
    latest_checkpoint,
    prune_checkpoints,
    resume_checkpoint,
    run_id_of,
    start_run,
)

MARK = "trainer_state.json"


def checkpoint(save, step: int, run_id: str | None, marker: str = MARK, complete: bool = True):
    d = save / "checkpoints" / f"step_{step}"
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"x")
    if complete:
        (d / marker).write_text(json.dumps({"step": step, **({"run_id": run_id} if run_id else {})}))
    return d


def test_a_new_or_empty_directory_is_taken_and_gets_a_run_id(tmp_path):
    save = tmp_path / "new" / "run"
    run_id = start_run(str(save), "sft", "no", False, {"train": {"lr": 0.1, "resume": "no"}})
    info = json.loads((save / "run.json").read_text())
    assert info["run_id"] == run_id == run_id_of(str(save)) and len(run_id) == 12
    assert info["stage"] == "sft" and info["config"] == {"train": {"lr": 0.1, "resume": "no"}}
    assert (save / "config.yaml").read_text().endswith("\nlr: 0.1\n")  # the flags, without run control
    (tmp_path / "empty").mkdir()
    check_save_path(str(tmp_path / "empty"), "no", False)  # an empty directory is fine


def test_a_fresh_run_into_a_directory_that_holds_files_is_refused(tmp_path):
    save = tmp_path / "run"
    start_run(str(save), "sft", "no", False, {})
    checkpoint(save, 3, run_id_of(str(save)))
    (save / "model.safetensors").write_bytes(b"w")
    with pytest.raises(ConfigError) as e:
        check_save_path(str(save), "no", False)
    assert str(e.value) == (f"--save_path: {save} already holds files (checkpoints, config.yaml, model.safetensors, "
                            "run.json); "
                            "continue that run with --resume auto, replace it with --overwrite, or pick another "
                            "--save_path")
    check_save_path(str(save), "auto", False)  # continuing it is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file; expected a directory"):
        check_save_path(str(tmp_path / "file"), "no", True)


def test_overwrite_removes_the_old_runs_state_and_gives_a_new_id(tmp_path):
    save = tmp_path / "run"
    old = start_run(str(save), "ppo", "no", False, {})
    checkpoint(save, 4, old, "ppo_state.json")
    (save / "tensorboard").mkdir()
    (save / "notes.txt").write_text("mine")
    new = start_run(str(save), "ppo", "no", True, {})
    assert new != old and run_id_of(str(save)) == new
    assert not (save / "checkpoints").exists() and not (save / "tensorboard").exists()
    assert (save / "notes.txt").read_text() == "mine"  # not the run's own state: left alone
    assert latest_checkpoint(str(save), "ppo_state.json") is None


def test_a_resumed_run_keeps_its_id_and_takes_only_its_own_checkpoints(tmp_path):
    save = tmp_path / "run"
    own = start_run(str(save), "sft", "no", False, {})
    checkpoint(save, 2, own)
    checkpoint(save, 9, "someoneelse")  # copied in from another run: newer, but not this run's
    checkpoint(save, 12, own, complete=False)  # a save that never finished
    assert start_run(str(save), "sft", "auto", False, {}) == own
    assert latest_checkpoint(str(save)) == str(save / "checkpoints" / "step_2")
    assert resume_checkpoint("auto", str(save)) == str(save / "checkpoints" / "step_2")
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        resume_checkpoint(str(save / "checkpoints" / "step_12"), str(save))


def test_a_directory_of_an_older_version_without_ids_still_resumes(tmp_path):
    save = tmp_path / "run"
    checkpoint(save, 5, None)
    assert latest_checkpoint(str(save)) == str(save / "checkpoints" / "step_5")


def test_prune_keeps_the_newest_complete_checkpoints_and_drops_unfinished_saves(tmp_path):
    save = tmp_path / "run"
    for step in (1, 2, 10, 3):
        checkpoint(save, step, "r")
    (save / "checkpoints" / "step_11.tmp").mkdir()
    removed = prune_checkpoints(str(save), 2, MARK)
    assert sorted(p.name for p in removed) == ["step_1", "step_11.tmp", "step_2"]
    assert sorted(p.name for p in (save / "checkpoints").iterdir()) == ["step_10", "step_3"]  # numeric order
    checkpoint(save, 20, "r")
    assert prune_checkpoints(str(save), 0, MARK) == []  # 0 keeps all
    assert len(list((save / "checkpoints").iterdir())) == 3
