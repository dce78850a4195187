"""`--config FILE` (YAML or JSON flags, the command line overriding them) and the config.yaml a run
writes and `--resume` compares against (coati_ray/config_file.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import pytest

from coati_ray.config import _help
from coati_ray.config_file import ConfigFileError, check_resumed_config, write_config


@dataclass
class _Flags:
    steps: int = _help("Steps.", default=3)
    lr: float | None = _help("Learning rate.", default=None)
    whiten: bool = _help("Whiten the advantages.", default=True)
    strategy: Literal["ddp", "fsdp"] = _help("Strategy.", default="ddp")
    reward_fn: list[str] | None = _help("Reward functions.", default=None)
    log_interval: int = _help("Log every N steps.", default=1)
    resume: str = _help("Where to resume from.", default="no")


def parse(argv):
    from coati_ray.cli import parse as cli_parse

    (f,), extra = cli_parse([_Flags], argv, "d")
    assert vars(extra) == {}  # --config is read, not handed on
    return f


def error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_a_yaml_file_sets_the_flags_and_the_command_line_overrides_it(tmp_path):
    f = tmp_path / "run.yaml"
    # 1e-5 is a string to YAML 1.1 (no dot): it must still reach --lr as the float the flag takes
    f.write_text("steps: 7\nlr: 1e-5\nwhiten: false\nstrategy: fsdp\nreward_fn: [a.py:f, b.py:g]\nlog_interval: null\n")
    got = parse(["--config", str(f)])
    assert (got.steps, got.lr, got.whiten, got.strategy) == (7, 1e-5, False, "fsdp")
    assert got.reward_fn == ["a.py:f", "b.py:g"]
    assert got.log_interval == 1  # null: the flag's default
    got = parse([f"--config={f}", "--steps", "9", "--whiten", "--lr", "0.5"])
    assert (got.steps, got.whiten, got.lr, got.strategy) == (9, True, 0.5, "fsdp")
    got = parse(["--steps", "9", "--config", str(f)])  # wherever --config stands, the flags win
    assert got.steps == 9


def test_a_json_file_works_the_same(tmp_path):
    f = tmp_path / "run.json"
    f.write_text('{\n  "steps": 4,\n  "whiten": false\n}\n')
    got = parse(["--config", str(f)])
    assert (got.steps, got.whiten) == (4, False)


@pytest.mark.parametrize("text,name,expected", [
    ("steps: 2\nstepz: 3\n", "run.yaml", "--config {f}: line 2: stepz: not a flag of this launcher; did you mean "
                                         "steps?"),
    ("steps: many\n", "run.yaml", "--config {f}: line 1: steps: 'many' is not a valid int"),
    ("lr: 0.1\nstrategy: zero3\n", "run.yaml", "--config {f}: line 2: strategy: 'zero3' is not one of ddp, fsdp"),
    ("steps: [1, 2]\n", "run.yaml", "--config {f}: line 1: steps: expected one value, got a list"),
    ("steps: 2\n  lr: [\n", "run.yaml", "--config {f}: line 2: not valid YAML"),
    ("- steps\n", "run.yaml", "--config {f}: expected a mapping of flag names to values"),
    ('{"steps": 1,\n "lr": }', "run.json", "--config {f}: line 2: not valid JSON"),
    ("config: other.yaml\n", "run.yaml", "--config {f}: line 1: config: not a flag of this launcher"),
])
def test_a_bad_file_is_one_line_naming_the_file_the_line_and_the_key(tmp_path, capsys, text, name, expected):
    f = tmp_path / name
    f.write_text(text)
    line = error_line(capsys, ["--config", str(f)])
    assert f"error: {expected.format(f=f)}" in line, line


def test_a_missing_file_or_value_is_named(tmp_path, capsys):
    line = error_line(capsys, ["--config", str(tmp_path / "no.yaml")])
    assert line.endswith(f"--config {tmp_path}/no.yaml: no such file")
    assert error_line(capsys, ["--config"]).endswith("error: --config: expected a YAML or JSON file after it")


def test_the_written_config_yaml_repeats_the_run(tmp_path):
    """A run's config.yaml given back with --config gives the same flags (run control left out)."""
    first = parse(["--steps", "5", "--lr", "2e-4", "--no_whiten", "--reward_fn", "x.py:f", "--resume", "auto"])
    from dataclasses import asdict

    path = write_config(tmp_path, {"train": asdict(first)})
    import yaml

    text = path.read_text()
    assert text.startswith("# This run's configuration") and "resume" not in yaml.safe_load(text)
    again = parse(["--config", str(path)])
    assert asdict(again) == {**asdict(first), "resume": "no"}


def test_resume_refuses_a_change_of_what_is_trained_and_warns_on_the_rest(tmp_path, caplog):
    saved = {"train": {"lr": 1e-4, "steps": 5, "log_interval": 1, "resume": "no"}, "cluster": {"trainers": 2}}
    write_config(tmp_path, saved)
    check_resumed_config(tmp_path, saved)  # the same: nothing to say
    with caplog.at_level(logging.WARNING):
        check_resumed_config(tmp_path, {"train": {**saved["train"], "log_interval": 5, "resume": "auto"},
                                        "cluster": {"trainers": 1}})
    assert "continuing with changed log_interval (1 -> 5); trainers (2 -> 1)" in caplog.text
    with pytest.raises(ConfigFileError) as e:
        check_resumed_config(tmp_path, {"train": {**saved["train"], "lr": 5e-4, "log_interval": 5}, "cluster": {}})
    msg = str(e.value)
    assert f"changes what the run in {tmp_path} trains (lr: 0.0001 there, 0.0005 now)" in msg
    assert "log_interval" not in msg and f"edit {tmp_path}/config.yaml to change them on purpose" in msg
    # editing the file is how a resumed run changes a setting on purpose
    (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace("0.0001", "0.0005"))
    check_resumed_config(tmp_path, {"train": {**saved["train"], "lr": 5e-4}, "cluster": {"trainers": 2}})
