"""Load instruction, pair and prompt datasets from files into `datasets.Dataset`, validated.

Supported inputs: `.json` (a list of objects, or JSON lines), `.jsonl`, `.csv`, `.tsv`,
`.parquet`, and directories written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`; Hub ids
and dataset repositories are read with `datasets.load_dataset` (hub.py), then validated the same way.
Text formats are parsed here rather than by `datasets.load_dataset` so that an error can name the
exact line; the result is always a `datasets.Dataset` with canonical column names.

Rows are loaded exactly or not at all: a value is never altered to make it fit. Every problem is a
`DataError` naming the file, line/row and field. With `skip_bad_rows=True` bad rows are skipped and
counted instead (`LoadedData.skipped`), and an empty result is still an error. In particular:

- Text files are decoded as UTF-8 (a leading byte-order mark, as Excel writes, is accepted) with no
  newline translation; JSON lines are split on "\n" only (a trailing "\r" is dropped), so U+2028,
  U+2029 and U+0085 inside a JSON string stay part of the value, and quoted CSV/TSV values keep
  their newlines exactly.
- A field must hold text. A number or boolean where text is expected (`"output": 42`, an int
  Parquet column) is a bad value like a list would be ("expected text, got int 42"), not converted
  with `str()`; a missing value (null / NaN) counts as empty.
- A JSON line nested too deeply to parse is a malformed row like any other invalid JSON.
- A file with no data rows (empty, header-only CSV, 0-row Parquet or saved dataset) is
  "the dataset is empty (no rows)" or, for a text file with no content at all, "the file is empty".
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets

from coati_ray.data import conversations as chat
from coati_ray.data import hub
from coati_ray.errors import DataError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv"}
TOO_DEEP = "invalid JSON: nested too deeply to parse"  # json.loads raises RecursionError


@dataclass
class LoadedData:
    dataset: datasets.Dataset
    skipped: list[str] = field(default_factory=list)  # one message per skipped row
    # per kept row, its fields other than the columns asked for, as parsed (JSON types kept; CSV gives
    # text): what a reward function reads besides the prompt (e.g. `answer`, `tests`)
    extra: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)


Kind = Literal["text", "prompt", "response", "chat", "label", "raw"]


@dataclass(frozen=True)
class Column:
    """A canonical field, the column it is read from, and whether an empty value is allowed.

    `kind`: text; prompt (text, or messages ending with a user turn); response (text, or one assistant
    message); chat (a conversation with assistant turns, see `conversations`); label (a boolean: JSON
    true/false, or the text true/false in CSV); raw (any value, for a variant's `finish`)."""

    name: str
    source: str
    required: bool = True  # the column must exist
    allow_empty: bool = False
    kind: Kind = "text"
    fallbacks: tuple[str, ...] = ()  # columns read when `source` is absent (e.g. ShareGPT's `conversations`)

    def find(self, row: dict) -> str | None:
        return next((s for s in (self.source, *self.fallbacks) if s in row), None)


@dataclass
class Variant:
    """One layout of a row; a schema of several is tried in order by whether a row has the first column
    (the last variant is the default, so its missing-field errors are the ones reported)."""

    columns: list[Column]
    finish: Callable[[dict], dict] | None = None  # canonical row from the columns; raises ChatError


def load_rows(path: str | Path, columns: list[Column] | list[Variant], skip_bad_rows: bool = False,
              max_samples: int | None = None, *, split: str = "train", config: str | None = None) -> LoadedData:
    """`path`: a file, a saved dataset, or a Hub id / dataset repository read with `split` and `config` (hub.py)."""
    ref = hub.resolve(path, split, config)
    path = Path(path)
    if ref is None and not path.exists():
        raise DataError(str(path), "no such file or directory")
    variants = columns if columns and isinstance(columns[0], Variant) else [Variant(columns)]
    raw = hub.read_rows(ref) if ref else _read(path)  # (line or None, row) pairs; DataError with line on parse errors
    where = str(ref) if ref else path  # what row errors name: the file, or the dataset with its config and split
    rows, skipped, extra = [], [], []
    for i, (line, row) in enumerate(raw):
        if isinstance(row, DataError):
            if not skip_bad_rows:
                raise row
            skipped.append(str(row))
            continue
        try:
            variant = _choose(variants, row)
            rows.append(_validate(where, i, line, row, variant))
            used = {s for c in variant.columns for s in (c.source, *c.fallbacks)}
            extra.append({k: v for k, v in row.items() if k not in used})
        except DataError as e:
            if not skip_bad_rows:
                raise
            skipped.append(str(e))
        if max_samples is not None and len(rows) >= max_samples:
            break
    if not raw:
        raise DataError(str(where), "the dataset is empty (no rows)")
    if not rows:
        raise DataError(str(where), f"no usable rows: all {len(skipped)} rows were bad; first: {skipped[0]}")
    if skipped:
        logger.warning("%s: skipped %d bad rows (first: %s)", where, len(skipped), skipped[0])
    return LoadedData(datasets.Dataset.from_list(_uniform(rows, variants)), skipped, extra)


def _choose(variants: list[Variant], row: Any) -> Variant:
    if isinstance(row, dict):
        for v in variants[:-1]:
            if v.columns[0].find(row) is not None:
                return v
    return variants[-1]


def _uniform(rows: list[dict], variants: list[Variant]) -> list[dict]:
    """Every row with the same columns and one type per column, as Arrow needs: a column a row's variant
    lacks is empty ("" or []), and a prompt column holding both text and messages holds messages (text t
    is the one user turn [{"role": "user", "content": t}], which renders to the same prompt)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    lists = {k for k in names if any(isinstance(r.get(k), list) for r in rows)}
    out = []
    for r in rows:
        u = {}
        for k in names:
            v = r.get(k, [] if k in lists else "")
            if k in lists and isinstance(v, str):
                v = chat.as_messages(v) if v else []
            u[k] = v
        out.append(u)
    return out


def _validate(path: Path | str, i: int, line: int | None, row: Any, variant: Variant) -> dict:
    if not isinstance(row, dict):
        raise DataError(str(path), f"expected an object with fields, got {type(row).__name__}", row=i, line=line)
    out: dict[str, Any] = {}
    for col in variant.columns:
        source = col.find(row)
        if source is None:
            if not col.required:
                out[col.name] = ""
                continue
            raise DataError(str(path), f"missing field (needed as '{col.name}'; present: {sorted(row)}); "
                            f"use --{col.name}_key to map another column", row=i, field=col.source, line=line)
        value = row[source]
        if col.kind != "text" and (isinstance(value, (list, dict)) or col.kind in ("label", "raw")):
            out[col.name] = _structured(path, i, line, source, col, value)
            continue
        if col.kind == "chat":
            raise DataError(str(path), f"expected a list of messages, got {type(value).__name__}", row=i,
                            field=source, line=line)
        if value is None or (isinstance(value, float) and value != value):  # a missing value (null / NaN)
            value = ""
        if isinstance(value, (bool, int, float)):  # never str() it: 1e3 -> "1000.0" is not what the file says
            raise DataError(str(path), f"expected text, got {type(value).__name__} {value!r}", row=i,
                            field=col.source, line=line)
        if not isinstance(value, str):
            raise DataError(str(path), f"expected text, got {type(value).__name__}", row=i, field=col.source,
                            line=line)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(str(path), "not valid Unicode: a lone surrogate (e.g. \\ud800 without its pair)",
                            row=i, field=col.source, line=line) from None
        if not value.strip() and not col.allow_empty:
            raise DataError(str(path), "expected non-empty text, got an empty value", row=i, field=col.source,
                            line=line)
        out[col.name] = value
    if variant.finish is not None:
        try:
            out = variant.finish(out)
        except chat.ChatError as e:
            raise DataError(str(path), str(e), row=i, line=line) from None
    return out


def _structured(path: Path | str, i: int, line: int | None, source: str, col: Column, value: Any) -> Any:
    """A value of a non-text kind, read exactly (a ChatError names the turn)."""
    if col.kind == "raw":
        return value
    if col.kind == "label":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise DataError(str(path), f"expected a boolean (true or false), got {type(value).__name__} {value!r}",
                        row=i, field=source, line=line)
    try:
        if col.kind == "prompt":
            return chat.read_prompt(value)
        if col.kind == "response":
            return chat.read_response(value)
        return chat.read_messages(value, need_assistant=True)
    except chat.ChatError as e:
        field = source if e.turn is None else f"{source}[{e.turn}]"
        raise DataError(str(path), e.message, row=i, field=field, line=line) from None


def _read(path: Path) -> list[tuple[int | None, Any]]:
    if path.is_dir():
        return [(None, r) for r in _read_saved_dataset(path)]
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            if pq.read_metadata(str(path)).num_rows == 0:  # from_parquet fails on it with Arrow noise
                return []
            ds = datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(str(path), f"not a readable Parquet file ({type(e).__name__}: {e})") from e
        return [(None, r) for r in ds]
    if suffix not in TEXT_SUFFIXES:
        raise DataError(str(path), f"unsupported file type '{suffix}'; expected .json, .jsonl, .csv, .tsv, "
                        ".parquet or a directory saved with datasets' save_to_disk")
    raw = path.read_bytes()
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # Excel writes a UTF-8 BOM by default
    try:
        text = raw[bom:].decode("utf-8")  # no newline translation: values keep their "\r\n" exactly
    except UnicodeDecodeError as e:
        raise DataError(str(path), f"not UTF-8 text (byte {e.start + bom})") from e
    if not text.strip():
        raise DataError(str(path), "the file is empty")
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and not _looks_like_jsonl(text):  # one JSON document (JSON lines start with an object)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), _invalid_json(e), line=e.lineno) from e
        except ValueError as e:
            raise DataError(str(path), _invalid_json(e)) from e
        except RecursionError as e:
            raise DataError(str(path), TOO_DEEP) from e
        if isinstance(data, dict):  # {"train": [...]} or a single object
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise DataError(str(path), f"expected a JSON list of objects, got {type(data).__name__}")
        return [(None, r) for r in data]
    return _read_jsonl(path, text)


def _looks_like_jsonl(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0].strip()
    if not first.startswith("{"):
        return False
    try:
        json.loads(first)
        return "\n" in text.strip()
    except (ValueError, RecursionError):  # JSONDecodeError, or a number too long to convert
        return False


def _read_jsonl(path: Path, text: str) -> list[tuple[int | None, Any]]:
    out: list[tuple[int | None, Any]] = []
    # "\n" only: str.splitlines() also breaks on U+2028 / U+2029 / U+0085, which are legal inside a JSON string
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")  # CRLF files
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except ValueError as e:  # JSONDecodeError, or a number of more digits than Python converts
            out.append((n, DataError(str(path), _invalid_json(e), row=len(out), line=n)))
        except RecursionError:
            out.append((n, DataError(str(path), TOO_DEEP, row=len(out), line=n)))
    return out


def _read_csv(path: Path, text: str, delimiter: str) -> list[tuple[int | None, Any]]:
    # newline="" as the csv module asks: a quoted value keeps its newlines ("\n", "\r\n") exactly;
    # str.splitlines() dropped them and also split on U+2028 / U+0085 inside values.
    # strict: an unterminated quote or text after a closing quote is an error, not a value that
    # swallows the rest of the file; no size limit of the csv module's own (131072 characters)
    csv.field_size_limit(2 ** 31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(str(path), "the file is empty") from None
    except csv.Error as e:
        raise DataError(str(path), f"malformed CSV: {e}", line=reader.line_num) from e
    out: list[tuple[int | None, Any]] = []
    last = reader.line_num
    try:
        for values in reader:
            line, last = last + 1, reader.line_num  # the row's first line (a quoted value may span several)
            # a blank line ([]), or a row of empty fields (",,": Excel's empty rows); a lone `""` is a value
            if not values or (len(values) > 1 and not any(v.strip() for v in values)):
                continue
            if len(values) != len(header):
                out.append((line, DataError(str(path), f"expected {len(header)} fields ({', '.join(header)}), "
                                            f"got {len(values)}", row=len(out), line=line)))
                continue
            out.append((line, dict(zip(header, values))))
    except csv.Error as e:  # the row that starts after the last whole one
        raise DataError(str(path), f"malformed CSV: {e}", row=len(out), line=last + 1) from e
    return out


def _invalid_json(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} (column {e.colno})"
    return f"invalid JSON: {str(e).split(';')[0]}"  # e.g. "Exceeds the limit (4300 digits) for integer ..."


def _read_saved_dataset(path: Path) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(str(path), "not a dataset directory: neither saved with save_to_disk nor a dataset repository "
                        f"(README.md card, data/ folder or data files) ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(str(path), f"a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    return ds


# Canonical column sets for each stage; `keys` maps canonical name -> column in the file.

def sft_columns(keys: dict[str, str]) -> list[Column]:
    return [Column("instruction", keys.get("instruction", "instruction")),
            Column("input", keys.get("input", "input"), required=False, allow_empty=True),
            Column("output", keys.get("output", "output"))]


def chat_columns(keys: dict[str, str]) -> list[Column]:
    """A conversation per row: OpenAI `messages`, else ShareGPT `conversations` (--messages_key maps another)."""
    key = keys.get("messages", "messages")
    return [Column("messages", key, kind="chat", fallbacks=("conversations",) if key == "messages" else ())]


def sft_schema(keys: dict[str, str]) -> list[Variant]:
    """SFT rows: a conversation (messages / conversations), else instruction / input / output."""
    return [Variant(chat_columns(keys)), Variant(sft_columns(keys))]


def _prompt_column(keys: dict[str, str]) -> Column:
    key = keys.get("prompt", "prompt")  # ColossalChat's preference data calls the prompt `context`
    return Column("prompt", key, kind="prompt", fallbacks=("context",) if key == "prompt" else ())


def pair_columns(keys: dict[str, str]) -> list[Column]:
    return [_prompt_column(keys)] + [Column(n, keys.get(n, n), kind="response") for n in ("chosen", "rejected")]


def _implicit_prompt(row: dict) -> dict:
    if not isinstance(row["chosen"], list):
        raise chat.ChatError("missing field 'prompt' (use --prompt_key to map another column), or give chosen and "
                             "rejected as whole conversations that share every turn but the last")
    prompt, c, r = chat.split_implicit_prompt(row["chosen"], row["rejected"])
    return {"prompt": prompt, "chosen": c, "rejected": r}


def pair_schema(keys: dict[str, str]) -> list[Variant]:
    """Pairs: prompt + chosen + rejected (text or messages), else chosen / rejected as whole conversations
    with the prompt implicit in their shared turns (TRL's implicit-prompt format)."""
    implicit = [Column(n, keys.get(n, n), kind="raw") for n in ("chosen", "rejected")]
    return [Variant(pair_columns(keys)), Variant(implicit, _implicit_prompt)]


def unpaired_columns(keys: dict[str, str]) -> list[Column]:
    """KTO rows: a prompt, one completion and whether it is desirable."""
    return [_prompt_column(keys), Column("completion", keys.get("completion", "completion"), kind="response"),
            Column("label", keys.get("label", "label"), kind="label")]


def prompt_columns(keys: dict[str, str]) -> list[Column]:
    return [_prompt_column(keys)]


def text_columns(keys: dict[str, str]) -> list[Column]:
    return [Column("text", keys.get("text", "text"))]
