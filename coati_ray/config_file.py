"""`--config FILE`: a launcher's flags from a YAML or JSON file, and the `config.yaml` every run writes.

A config file is one mapping of flag names (without `--`) to values, as TRL's `--config` takes:

    pretrain: Qwen/Qwen2.5-0.5B-Instruct      # a model path or hub name
    lr: 1.0e-5
    packing: false                            # a switch: true / false
    reward_fn: [math]                         # a flag that takes several values: a list

Flags on the command line override the file. Every value goes through the flag's own type and
choices, so the file cannot say what the command line could not; a wrong key or value is one
line naming the file, the line and the key. A run writes its whole resolved configuration to
`<save_path>/config.yaml` in this form (`--config <save_path>/config.yaml` repeats it), and
`--resume` compares against that file: a difference that changes what is trained is refused,
one that does not (logging, checkpoints, how many actors) is a warning. Editing the file is how
a resumed run changes a setting on purpose. Ground floor: imports nothing of coati_ray but `errors`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
from pathlib import Path
from typing import Any, NoReturn

from coati_ray.errors import CoatiError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# not part of a run's configuration: how this command treats the directory
RUN_CONTROL = ("resume", "overwrite")
# settings a resumed run may change with a warning: where and how it runs, what it logs and saves, and
# how long it goes on (max_steps: a learning-rate schedule over the run's length follows the new value)
HARMLESS = {"log_interval", "ckpt_interval", "keep_checkpoints", "sync_check_interval", "save_path", "strategy",
            "log_samples_interval", "report_to", "max_steps"}
# the parts that say how many actors run where (PPO's roles; every stage's cluster)
HARMLESS_PARTS = ("cluster", "roles")


class ConfigFileError(CoatiError, ValueError):
    """A config file that cannot be used: the message names the file, the line and the key."""


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the path `--config` names, argv without it)."""
    out, path = [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigFileError("--config: expected a YAML or JSON file after it")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return path, out


def read_mapping(path: str) -> list[tuple[str, Any, int]]:
    """(key, value, line) of each entry of the file's top-level mapping, in file order."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                _not_a_map(path)
            return [(k, v, _json_line(text, k)) for k, v in data.items()]
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            return []
        if not isinstance(root, yaml.MappingNode):
            _not_a_map(path)
        data = yaml.safe_load(text)
        lines = {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
        return [(k, v, lines.get(str(k), 0)) for k, v in data.items()]
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"--config {path}: line {e.lineno}: not valid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigFileError(f"--config {path}: {where}not valid YAML: {getattr(e, 'problem', None) or e}") from None


def _not_a_map(path: str) -> NoReturn:
    raise ConfigFileError(f"--config {path}: expected a mapping of flag names to values (flag: value per line)")


def _json_line(text: str, key: str) -> int:
    needle = json.dumps(key)
    for n, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return n
    return 0


def file_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The file's values, each converted and checked as the command line would: {dest: value}."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    out: dict[str, Any] = {}
    for key, value, line in read_mapping(path):
        where = f"--config {path}: line {line}: {key}" if line else f"--config {path}: {key}"
        if not isinstance(key, str) or key not in actions or key == "config":
            close = difflib.get_close_matches(str(key), [k for k in actions if k != "config"], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigFileError(f"{where}: not a flag of this launcher{hint} (keys are flag names without --)")
        if value is None:
            continue  # null: the flag's default
        out[key] = _convert(actions[key], value, where)
    return out


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1
    if isinstance(value, (dict, list)) and not (many and isinstance(value, list)):
        raise ConfigFileError(f"{where}: expected one value, got a {type(value).__name__}")
    if many:
        return [_one(action, v, where) for v in (value if isinstance(value, list) else [value])]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
        return value
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except argparse.ArgumentTypeError as e:  # the flag's own check, which says what it expected
        raise ConfigFileError(f"{where}: {e}") from None
    except (ValueError, TypeError):
        kind = getattr(action.type, "__name__", "value")
        raise ConfigFileError(f"{where}: {value!r} is not a valid {kind}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigFileError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


# --- a run's config.yaml ----------------------------------------------------------------------------
def flat(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{flag: value} of a run's configuration by part ({"model": {...}, "train": {...}}), run control left out."""
    return {k: v for part in config.values() for k, v in part.items() if k not in RUN_CONTROL}


def write_config(save_path: str | Path, config: dict[str, dict[str, Any]]) -> Path:
    import yaml

    out = Path(save_path) / CONFIG_FILE
    values = json.loads(json.dumps(flat(config), default=str))  # plain YAML types only
    header = "# This run's configuration: `--config` takes this file; --resume compares against it.\n"
    out.write_text(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def check_resumed_config(save_path: str | Path, config: dict[str, dict[str, Any]]) -> None:
    """Compare this command's configuration with the one the run in `save_path` was started with."""
    import yaml

    f = Path(save_path) / CONFIG_FILE
    if not f.is_file():
        return  # a run of a version that wrote none
    saved = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    now = json.loads(json.dumps(flat(config), default=str))
    harmless = HARMLESS | {k for part in HARMLESS_PARTS for k in config.get(part, {})}
    changed = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved[k] != v}
    refused = {k: d for k, d in changed.items() if k not in harmless}
    if refused:
        shown = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in refused.items())
        raise ConfigFileError(
            f"--resume: this command changes what the run in {save_path} trains ({shown}). Give the same values "
            f"(--config {f} repeats them), edit {f} to change them on purpose, or start a new run "
            "(--overwrite or another --save_path)")
    if changed:
        logger.warning("--resume: continuing with changed %s", "; ".join(
            f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items()))
