"""Every launcher's command line, as a user meets it: `--help`, unknown flags, bad values, and only
the flags its stage reads. Subprocesses, but nothing starts Ray or loads a model (each is about a
second: the launchers import their heavy modules only after parsing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from coati_ray.config import _help

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = sorted(p.name for p in (ROOT / "launchers").glob("*.py"))
# a flag of each launcher that takes an int, for the bad-value case
INT_FLAG = {"control.py": "--generators", "demo.py": "--trainers", "ppo_cluster.py": "--trainers",
            "prometheus.py": "--port", "report.py": "--dpi", "serve.py": "--port", "train_dpo.py": "--trainers",
            "train_reward_model.py": "--trainers",
            "train_sft.py": "--trainers"}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(ROOT / "launchers" / script), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT, check=False)


def help_entries(text: str) -> dict[str, str]:
    """{first option string or positional name: its help text} from argparse's --help output."""
    entries: dict[str, str] = {}
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l in ("positional arguments:", "options:")), None)
    assert start is not None, f"not argparse's --help output:\n{text}"
    current = None
    for line in lines[start:]:
        if not line.strip() or re.match(r"^\S", line):  # blank line or a section title
            current = None
        elif re.match(r"^  \S", line):  # an entry: "  --flag VALUE[, --alias VALUE]   help..."
            invocation, _, rest = line.strip().partition("  ")
            current = invocation.split(",")[0].split()[0]
            entries[current] = rest.strip()
        elif current is not None:  # a continuation of the current entry's help
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


def test_every_launcher_is_covered():
    assert set(LAUNCHERS) == set(INT_FLAG)


def coati(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    """The `coati` command: its console script (what `pip install` makes), or `python -m coati_ray.commands`."""
    exe = Path(sys.executable).parent / "coati"
    if script:
        assert exe.exists(), f"{exe} is missing: reinstall the package (scripts/setup.sh test) for its script"
    cmd = [str(exe)] if script else [sys.executable, "-m", "coati_ray.commands"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT, check=False)


def test_the_coati_command_runs_every_launcher_by_name():
    import tomllib

    from coati_ray.commands import COMMANDS

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"coati": "coati_ray.commands:main"}
    assert {f"{module}.py" for module, _ in COMMANDS.values()} == set(LAUNCHERS)  # one sub-command per launcher
    p = coati("--help", script=True)
    assert p.returncode == 0 and all(f"  {name}" in p.stdout for name in COMMANDS), p.stdout
    # a sub-command is its launcher: the same flags, and usage lines that name it
    for name, (module, _) in COMMANDS.items():
        sub, launcher = coati(name, "--help"), run(f"{module}.py", "--help")
        assert sub.returncode == launcher.returncode == 0, sub.stderr[-2000:]
        assert help_entries(sub.stdout) == help_entries(launcher.stdout), name
        assert sub.stdout.startswith(f"usage: coati {name} "), sub.stdout[:200]
    p = coati("trian")
    assert p.returncode == 2 and p.stderr.splitlines()[-1] == (
        "coati: error: unknown command 'trian'; expected one of sft, rm, dpo, ppo, serve, demo, control, report, "
        "prometheus")
    p = coati("sft", "--max_stepz", "3")
    assert p.returncode == 2 and p.stderr.splitlines()[-1] == "coati sft: error: unrecognized arguments: --max_stepz 3"


def help_of(script: str) -> dict[str, str]:
    p = run(script, "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    return help_entries(p.stdout)


@pytest.mark.parametrize("script", LAUNCHERS)
def test_help_has_a_text_for_every_flag(script):
    entries = help_of(script)
    assert "-h" in entries and len(entries) > 2, entries
    missing = [flag for flag, text in entries.items() if not text]
    assert not missing, f"no help text for {missing}"
    for flag, text in entries.items():
        if flag.startswith("--no_"):
            positive = entries["--" + flag[len("--no_"):]]
            assert text.split(" (default")[0] != positive.split(" (default")[0], flag
            assert text.startswith("Do not "), (flag, text)


@pytest.mark.parametrize("script", LAUNCHERS)
def test_an_unknown_flag_is_one_usage_error_with_exit_2(script):
    p = run(script, "--not_a_flag")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error: unrecognized arguments: --not_a_flag" in p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("usage: ")


@pytest.mark.parametrize("script", LAUNCHERS)
def test_a_bad_value_is_one_error_line_with_exit_2(script):
    flag = INT_FLAG[script]
    p = run(script, flag, "abc")
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [l for l in p.stderr.splitlines() if "error:" in l]
    assert errors == [f"{script}: error: argument {flag}: invalid int value: 'abc'"], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("script,absent", [
    ("ppo_cluster.py", ["--dataset", "--eval_dataset", "--eval_split", "--max_samples", "--instruction_key",
                        "--input_key", "--output_key", "--chosen_key", "--rejected_key", "--local"]),
    ("train_sft.py", ["--chosen_key", "--rejected_key", "--prompt_key"]),
    ("train_reward_model.py", ["--instruction_key", "--input_key", "--output_key"]),
])
def test_each_stage_lists_only_the_flags_it_reads(script, absent):
    entries = help_of(script)
    assert not [f for f in absent if f in entries]


@pytest.mark.parametrize("script,present", [
    ("ppo_cluster.py", ["--prompt_key", "--max_len", "--skip_bad_rows", "--prompt_dataset", "--rm_path",
                        "--no_whiten_advantages"]),
    ("train_sft.py", ["--dataset", "--eval_dataset", "--instruction_key", "--input_key", "--output_key", "--local"]),
    ("train_reward_model.py", ["--dataset", "--prompt_key", "--chosen_key", "--rejected_key", "--loss_fn",
                               "--local"]),
])
def test_each_stage_lists_the_flags_it_reads(script, present):
    entries = help_of(script)
    assert not [f for f in present if f not in entries]


def test_the_reward_model_launcher_shows_its_own_save_path_default():
    entries = help_of("train_reward_model.py")
    assert "(default: outputs/rm)" in entries["--save_path"]


# --- cli.parse in this process -----------------------------------------------------------------------

@dataclass
class _Flags:
    whiten: bool = _help("Whiten the advantages.", default=True)
    steps: int = _help("Steps.", default=3)
    resume: str = _help("Where to resume from.", default="no")


def test_parse_fills_the_dataclasses_and_the_positionals():
    from coati_ray.cli import parse

    (f,), extra = parse([_Flags], ["--no_whiten", "--steps", "5", "data.csv", "--resume"], "d",
                        positional=[("data", "A file.")], local_flag=True)
    assert (f.whiten, f.steps, f.resume) == (False, 5, "auto")  # bare --resume means auto
    assert extra.data == "data.csv" and extra.local is False
    (f,), extra = parse([_Flags], [], "d")
    assert (f.whiten, f.steps, f.resume) == (True, 3, "no") and vars(extra) == {}


def test_parse_says_what_a_no_flag_does(capsys):
    from coati_ray.cli import parse

    with pytest.raises(SystemExit) as e:
        parse([_Flags], ["--help"], "d")
    assert e.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    assert entries["--whiten"] == "Whiten the advantages. (default: True)"
    assert entries["--no_whiten"] == "Do not whiten the advantages."


def test_parse_reports_unknown_flags_and_failed_checks_as_usage_errors(capsys):
    from coati_ray.cli import parse

    for argv, check, message in [(["--steps", "1", "--nope", "x"], None, "unrecognized arguments: --nope x"),
                                 (["--steps", "1"], lambda parts: "needs more steps", "needs more steps")]:
        with pytest.raises(SystemExit) as e:
            parse([_Flags], argv, "d", check=check)
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
