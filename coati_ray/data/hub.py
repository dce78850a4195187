"""Datasets by name: Hugging Face Hub ids and local dataset repositories, read with `datasets`.

How a dataset flag's value is read (`resolve`):

    an existing file                          loading.py's own readers (.json/.jsonl/.csv/.tsv/.parquet)
    a directory written by save_to_disk       datasets.load_from_disk (it holds state.json, dataset_dict.json
                                              or dataset_info.json)
    a directory laid out as the Hub serves    a dataset repository (a README.md card whose YAML `configs:` name
      a dataset repository                    data_files, or data/*.parquet shards; a bare directory of
                                              files is refused):
                                              load_dataset(DIR, config, split=split)
    `org/name` that is no existing path       load_dataset("org/name", config, split=split): the Hub, or its
                                              local cache when HF_HUB_OFFLINE=1

Every dataset flag X has X_split and X_config (coati_ray/config.py), used for the last two kinds only.
The rows then go through the same exact validation as a file's (loading.py): an error names the
dataset, its config and split, the row and the field. Here, what can go wrong before the rows is one
`DataError` line, never a library traceback: the Hub unreachable (with the command that downloads the
repository for offline use), no such dataset, an unknown config or split (naming the ones there are).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coati_ray.errors import ConfigError, DataError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")  # a missing one of these is a file, not an id
SAVED_MARKERS = ("state.json", "dataset_dict.json", "dataset_info.json")  # what save_to_disk writes
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the Hub spells repository ids


@dataclass(frozen=True)
class HubRef:
    """A dataset that `datasets.load_dataset` reads: a Hub id or a local repository directory."""

    name: str
    split: str = "train"  # a split name, or a slice of one ("train[:1000]", as datasets reads it)
    config: str | None = None
    local: bool = False  # name is an existing directory

    def __str__(self) -> str:  # how row errors name it: the dataset, its config and split
        return f"{self.name} ({f'config {self.config}, ' if self.config else ''}split {self.split})"


def is_saved_dataset(path: Path) -> bool:
    return any((path / m).is_file() for m in SAVED_MARKERS)


def is_repository(path: Path) -> bool:
    """A directory as the Hub serves a dataset: a README.md card or a data/ folder. Not a bare directory of
    data files: datasets would parse every file under it with its own builders (numbers cast to a shared
    type, CSV's NA read as missing), so such a directory stays refused (scripts/probe.py checks it) and a
    file is read by our exact readers."""
    return not is_saved_dataset(path) and ((path / "README.md").is_file() or (path / "data").is_dir())


def resolve(value: str | Path, split: str = "train", config: str | None = None) -> HubRef | None:
    """The `HubRef` a dataset flag's value names, or None for a local file or saved dataset (and for a
    missing path that cannot be an id: loading.py says "no such file or directory")."""
    path = Path(value)
    if path.is_dir() and is_repository(path):
        return HubRef(str(path), split, config, local=True)
    if path.exists() or not HUB_ID.fullmatch(str(value)) or str(value).lower().endswith(DATA_SUFFIXES):
        return None
    return HubRef(str(value), split, config)


def check_source(value: str | None, flag: str, data: Any) -> None:
    """Before any actor starts: `--flag value` names data that can be read (`data`: the stage's data args,
    holding `<flag>_split` and `<flag>_config`). A Hub id or repository is loaded here, into datasets'
    cache where the actors find it, so a bad name, split or config, or an unreachable Hub, stops the
    run at once with a line naming the flag."""
    ref = None if value is None else resolve(value, **data.hub_options(flag))
    if ref is not None:
        open_dataset(ref, flag)
        return
    if value is not None and not Path(value).exists():
        raise DataError(str(value), "no such file or directory")
    defaults = {f.name: f.default for f in dataclasses.fields(data)}
    for name in (f"{flag}_split", f"{flag}_config"):  # the flag would be ignored: refuse it instead
        if getattr(data, name) != defaults[name]:
            raise ConfigError(name, f"given without --{flag}" if value is None else f"applies to a Hub dataset id "
                              f"or a dataset repository; --{flag} {value} is a file or a saved dataset")


class Rows:
    """A loaded split as loading.py's readers give rows: (line, row) pairs, line None; read lazily."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[None, dict]]:
        return ((None, row) for row in self.dataset)


def read_rows(ref: HubRef) -> Rows:
    return Rows(open_dataset(ref))


def open_dataset(ref: HubRef, flag: str | None = None):
    """The `datasets.Dataset` of `ref`'s config and split; every failure a one-line `DataError`."""
    from datasets.utils import logging as ds_logging

    label = f"--{flag} {ref.name}" if flag else ref.name
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # a bar per shard and split: our log says what was loaded
    try:
        builder = _builder(ref, label, flag)
        splits = list(builder.config.data_files or builder.info.splits or ())
        if splits and ref.split.split("[")[0] not in splits:
            where = f" of config {builder.config.name}" if ref.config else ""
            raise DataError(label, f"no split '{ref.split}'{where}; its splits: {', '.join(splits)}"
                            f"{_pick(flag, 'split')}")
        try:
            builder.download_and_prepare()
            dataset = builder.as_dataset(split=ref.split)
        except ConnectionError as e:  # a shard the cache lacks while the Hub is out of reach
            raise _unreachable(ref, label, flag, e) from None
        except Exception as e:  # datasets raises many types for shards it cannot read or that disagree
            raise _failed(label, "cannot read it", e) from None
        _check_shard_types(builder.config.data_files or {}, ref.split.split("[")[0], dataset.features, label)
        return dataset
    finally:
        if bars:
            ds_logging.enable_progress_bar()


def _builder(ref: HubRef, label: str, flag: str | None):
    import datasets

    try:
        return datasets.load_dataset_builder(ref.name, ref.config)
    except ConnectionError as e:
        raise _unreachable(ref, label, flag, e) from None
    except FileNotFoundError as e:  # DatasetNotFoundError, DataFilesNotFoundError
        if ref.local:
            raise DataError(label, f"not a dataset: a repository without data files ({_first_line(e)})") from None
        raise DataError(label, "no such local path, and no dataset of that id on the Hugging Face Hub (or it "
                        f"is gated or private: log in with `hf auth login`) ({_first_line(e)})") from None
    except ValueError as e:  # an unknown config, or none given where the dataset has several
        configs = _config_names(ref.name)
        if ref.config is not None and configs and ref.config not in configs:
            raise DataError(label, f"no config '{ref.config}'; its configs: {', '.join(configs)}"
                            f"{_pick(flag, 'config')}") from None
        if ref.config is None and len(configs) > 1:
            raise DataError(label, f"has {len(configs)} configs and none is the default: "
                            f"{', '.join(configs)}{_pick(flag, 'config')}") from None
        raise _failed(label, "cannot load it", e) from None
    except Exception as e:
        raise _failed(label, "cannot load it", e) from None


def _check_shard_types(data_files: dict, split: str, features: Any, label: str) -> None:
    """datasets casts every shard to the column types of the config's first shard (an int64 `output` becomes
    the text "42"): a local Parquet shard of `split` whose types differ is an error here, as such a value in a
    file is. Shards datasets fetches from the Hub are not checked (a repository downloaded with `hf download`
    is)."""
    import pyarrow.parquet as pq
    from datasets import Features

    def kind(feature: Any) -> str:
        return str(feature).replace("large_string", "string")  # the same text either way

    for f in data_files.get(split, []):
        if str(f).lower().endswith(".parquet") and Path(f).is_file():
            for name, feature in Features.from_arrow_schema(pq.read_schema(f)).items():
                if name in features and kind(feature) != kind(features[name]):
                    raise DataError(label, f"shard {f}: column '{name}' is {kind(feature)}, the dataset's (its first "
                                    f"shard's) {kind(features[name])}; datasets would convert its values (make the "
                                    "shards' column types agree)")


def _config_names(name: str) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_config_names(name))
    except Exception:  # the names only improve the message; the error at hand is reported either way
        return []


def _pick(flag: str | None, what: str) -> str:
    return f"; pick one with --{flag}_{what}" if flag else ""


def _unreachable(ref: HubRef, label: str, flag: str | None, e: BaseException) -> DataError:
    reason = re.search(r"\((\w+)\)\s*$", str(e))  # datasets: "Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)"
    why = reason.group(1) if reason else _first_line(e)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why += ", HF_HUB_OFFLINE is set"
    dest = ref.name.split("/")[-1]
    return DataError(label, f"no such local path, and cannot reach the Hugging Face Hub ({why}) to fetch it as a "
                     f"dataset id; download it first (`hf download --repo-type dataset {ref.name} --local-dir "
                     f"{dest}`) and pass --{flag or 'dataset'} {dest}")


def _failed(label: str, what: str, e: BaseException) -> DataError:
    cause = e.__cause__ or e.__context__
    detail = _first_line(e) + (f"; {_first_line(cause)}" if cause is not None and str(cause) else "")
    return DataError(label, f"{what} with datasets ({type(e).__name__}: {detail})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
