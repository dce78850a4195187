#!/usr/bin/env python
"""Hostile-but-fair probe: bad input through the real loaders, launchers and server, every case classified.

    python scripts/probe.py                      # all four parts: table on stdout, JSON in bench/probe.json
    python scripts/probe.py --quick              # loaders + flags, a reduced case list (< 60 s; the unit test)
    python scripts/probe.py --parts server,flags --show_all

Parts (`--parts`):

- loaders: 771 bad or tricky data files (.jsonl, .json, .csv, .tsv, .parquet, saved dataset
  directories) for the three stages' columns (SFT instruction/input/output, RM prompt/chosen/rejected,
  PPO prompt), written to a temporary directory and loaded by `coati_ray.data.loading.load_rows` in a
  worker process, each with and without skip_bad_rows (one case each).
- launchers: bad data files given to launchers/train_sft.py (--local), train_reward_model.py (--local)
  and ppo_cluster.py, each a subprocess.
- flags: bad flags to every launcher (launchers/*.py), each a subprocess.
- server: launchers/serve.py on the micro preset on 127.0.0.1 (a free port, an API key) and bad
  requests to /v1/chat/completions and /v1/completions over raw sockets, a 50 MB body included.

Each case gets exactly one outcome:

- ok: a valid file loaded with exactly the rows written; with skip_bad_rows, the good rows exactly
  and one skip per bad row (rows loaded + rows skipped = rows written).
- clear: the input was refused with a clear error. Loaders: a CoatiError whose message is one line
  naming the file and, for a bad row, its line / row / field. Launchers and flags: exit status 2,
  one `error:` line (naming the data file, for a data case), no traceback. Server: a 4xx whose body
  is OpenAI's error object {"error": {"message", "type", "param", "code"}}.
- traceback: any other exception, a CoatiError that is not clear, another exit status, a 5xx, a
  non-OpenAI error body, or a connection closed without an answer.
- hang: no answer within the case's time bound (the case is killed).
- lost: the input was taken without an error but not exactly: rows that differ from the file, skip
  counts that do not add up, a bad value accepted (exit 0, a run that got as far as starting Ray or
  serving, an HTTP 2xx to a bad request).

Exit status 1 when any case is a traceback, hang or lost; every such case is printed with what
reproduces it (input bytes, command, response).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("loaders", "launchers", "flags", "server")
QUICK_PARTS = ("loaders", "flags")
OUTCOMES = ("ok", "clear", "traceback", "hang", "lost")
HEADERS = {"ok": "ok / clear error", "traceback": "tracebacks / 5xx", "hang": "hangs", "lost": "data lost / changed"}


@dataclass
class Result:
    part: str
    name: str
    outcome: str  # one of OUTCOMES
    detail: str = ""
    repro: dict = field(default_factory=dict)
    valid_refused: bool = False  # a valid input refused with a clear error (counted as clear; listed apart)
    seconds: float = 0.0


def clip(text: str | bytes, n: int = 600) -> str:
    """A printable excerpt: repr of bytes, text cut in the middle when long."""
    s = repr(text) if isinstance(text, bytes) else str(text)
    return s if len(s) <= n else f"{s[:n * 2 // 3]} ...[{len(s) - n} chars]... {s[-n // 3:]}"


# ====================================================================================== loaders

STAGE_FIELDS = {"sft": ("instruction", "input", "output"), "rm": ("prompt", "chosen", "rejected"), "ppo": ("prompt",)}
OPTIONAL = {"input"}  # SFT's input may be missing or empty
BASE_ROWS = {
    "sft": [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Solve.", "input": "小明有3个苹果", "output": "答案是3。"},
            {"instruction": "Say hi.", "input": "to Tom", "output": "Hi, Tom!"}],
    "rm": [{"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
           {"prompt": "中国的首都?", "chosen": "北京", "rejected": "上海"},
           {"prompt": "Spell cat.", "chosen": "c-a-t", "rejected": "k-a-t"}],
    "ppo": [{"prompt": "What is 7 x 6?"}, {"prompt": "小明有3个苹果，又买了5个。一共有多少个？"},
            {"prompt": "Name a colour."}],
}
ODD = "a\u2028b\u2029c\u0085d"  # line separators that are legal inside a JSON string
MISSING = object()  # a field left out of the row


class Raw(str):
    """JSON text written as is (NaN, 5000 digits, unbalanced brackets, an escaped lone surrogate)."""


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def obj_text(row: dict) -> str:
    """One JSON object as text, with Raw values as written and MISSING fields left out."""
    parts = [f"{dumps(k)}: {v if isinstance(v, Raw) else dumps(v)}" for k, v in row.items() if v is not MISSING]
    return "{" + ", ".join(parts) + "}"


def canon(stage: str, row: dict, keys: dict | None = None) -> dict:
    """The row as load_rows should return it: canonical names, a missing optional field as ""."""
    keys = keys or {}
    out = {}
    for f in STAGE_FIELDS[stage]:
        v = row.get(keys.get(f, f), MISSING)
        out[f] = "" if v is MISSING or v is None else v
    return out


def base(stage: str) -> list[dict]:
    return [dict(r) for r in BASE_ROWS[stage]]


@dataclass
class DataCase:
    """One data file and what loading it must give.

    expect: "rows" (valid: exactly `rows`), "bad" (`rows` with None for each bad row: refused without
    skip_bad_rows; with it, the good rows and one skip per None), "file" (refused either way),
    "either" (any of `options` exactly, or a clear error: conventions differ, e.g. duplicated keys).
    """

    name: str
    stage: str
    suffix: str
    content: bytes | Callable[[Path], None] | None  # None: the path does not exist
    expect: str
    rows: list = field(default_factory=list)
    where: str | None = None  # what the error must name for the first bad row, e.g. "line 2"
    keys: dict = field(default_factory=dict)
    max_samples: int | None = None
    options: list = field(default_factory=list)


def jsonl_bytes(lines: list[str], nl: str = "\n", bom: bool = False, final_newline: bool = True) -> bytes:
    text = nl.join(lines) + (nl if final_newline else "")
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")


def json_list_bytes(rows: list[dict], indent: bool = True) -> bytes:
    sep = ",\n  " if indent else ", "
    return ("[" + ("\n  " if indent else "") + sep.join(obj_text(r) for r in rows) + ("\n]" if indent else "]")
            ).encode("utf-8")


def csv_bytes(header: list[str], rows: list[list[str]], delimiter: str = ",", nl: str = "\n", bom: bool = False,
              final_newline: bool = True) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator=nl)
    w.writerow(header)
    w.writerows(rows)
    text = buf.getvalue()
    if not final_newline:
        text = text[:-len(nl)]
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")


def parquet_writer(columns: dict) -> Callable[[Path], None]:
    """columns: name -> list of values, or a callable returning a pyarrow array (built in the writer)."""

    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {k: (v() if callable(v) else pa.array(v)) for k, v in columns.items()}
        pq.write_table(pa.table(arrays), str(path), row_group_size=2)

    return write


def columns_of(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


# (name, value in the file, valid for a required field, valid for an optional one, value loaded when valid,
#  a JSON syntax problem: the whole .json document fails, not one row)
VALUE_MUTATIONS = [
    ("missing", MISSING, False, True, "", False),
    ("empty", "", False, True, "", False),
    ("whitespace", " \t ", False, True, " \t ", False),
    ("null", None, False, True, "", False),
    ("int", 42, False, False, None, False),
    ("float", 4.5, False, False, None, False),
    ("bool", True, False, False, None, False),
    ("list", ["a", "b"], False, False, None, False),
    ("object", {"text": "a"}, False, False, None, False),
    ("nan_literal", Raw("NaN"), False, True, "", False),
    ("infinity_literal", Raw("Infinity"), False, False, None, False),
    ("int_5000_digits", Raw("7" * 5000), False, False, None, True),
    ("nested_list_depth_60", Raw("[" * 60 + "]" * 60), False, False, None, False),
    ("unclosed_list_depth_100000", Raw("[" * 100000), False, False, None, True),
    ("lone_surrogate", Raw('"x\\ud800y"'), False, False, None, False),
    ("number_as_text", "042", True, True, "042", False),
    ("nul_character", "a\u0000b", True, True, "a\u0000b", False),
    ("odd_line_separators", ODD, True, True, ODD, False),
]


def value_cases(big: bool) -> list[DataCase]:
    """Each field of each stage, one bad or tricky value in the middle row, as JSON lines and a JSON list."""
    out = []
    for stage, fields in STAGE_FIELDS.items():
        for f in fields:
            for mname, value, ok_req, ok_opt, loaded, syntax in VALUE_MUTATIONS:
                rows = base(stage)
                rows[1][f] = value
                valid = ok_opt if f in OPTIONAL else ok_req
                expected = base(stage)
                expected[1][f] = loaded
                for suffix in (".jsonl", ".json"):
                    if suffix == ".json" and not (stage == "ppo" or f in ("output", "input", "rejected")):
                        continue  # the JSON list form for four of the seven fields
                    content = (jsonl_bytes([obj_text(r) for r in rows]) if suffix == ".jsonl"
                               else json_list_bytes(rows))
                    name = f"{stage}.{f}={mname}{suffix}"
                    if valid:
                        out.append(DataCase(name, stage, suffix, content, "rows", [canon(stage, r) for r in expected]))
                    elif syntax and suffix == ".json":
                        out.append(DataCase(name, stage, suffix, content, "file"))
                    else:
                        where = "line 2" if suffix == ".jsonl" else "row 1"
                        out.append(DataCase(name, stage, suffix, content, "bad",
                                            [canon(stage, rows[0]), None, canon(stage, rows[2])], where))
    return out


def structural_jsonl_cases() -> list[DataCase]:
    """A malformed line among good ones, for each stage."""
    out = []
    for stage, fields in STAGE_FIELDS.items():
        f = fields[0]
        good = base(stage)
        obj = obj_text(good[1])
        lines = {
            "truncated_object": obj[:len(obj) // 2],
            "trailing_comma": obj[:-1] + ",}",
            "single_quotes": obj.replace('"', "'"),
            "unquoted_key": obj.replace(f'"{f}"', f, 1),
            "array_row": '["a", "b"]',
            "string_row": '"just some text"',
            "number_row": "42",
            "null_row": "null",
            "true_row": "true",
            "nan_row": "NaN",
            "list_of_rows_on_one_line": "[" + obj + "]",
            "two_objects_on_one_line": obj + obj,
            "trailing_garbage": obj + " xyz",
            "slash_comment": "// a comment",
            "hash_comment": "# a comment",
            "bom_in_the_middle": "\ufeff" + obj,
            "raw_tab_in_string": obj.replace('": "', '": "a\tb', 1),
            "raw_control_character": obj.replace('": "', '": "a\x01b', 1),
            "unclosed_array_depth_100000": "[" * 100000,
            "unclosed_object_depth_100000": '{"a": ' * 100000,
            "closed_array_depth_5000": "[" * 5000 + "]" * 5000,
            "key_in_other_case": obj.replace(f'"{f}"', f'"{f.capitalize()}"', 1),
            "key_with_trailing_space": obj.replace(f'"{f}"', f'"{f} "', 1),
        }
        for lname, bad_line in lines.items():
            text_lines = [obj_text(good[0]), bad_line, obj_text(good[2]), obj_text(good[0])]
            expected = [canon(stage, good[0]), None, canon(stage, good[2]), canon(stage, good[0])]
            out.append(DataCase(f"{stage}.jsonl:{lname}", stage, ".jsonl", jsonl_bytes(text_lines), "bad", expected,
                                "line 2"))
        cut = obj_text(good[2])
        out.append(DataCase(f"{stage}.jsonl:last_line_cut_mid_write", stage, ".jsonl",
                            jsonl_bytes([obj_text(good[0]), obj_text(good[1]), cut[:len(cut) - 5]],
                                        final_newline=False),
                            "bad", [canon(stage, good[0]), canon(stage, good[1]), None], "line 3"))
    return out


def tricky_jsonl_cases(big: bool) -> list[DataCase]:
    huge = 20_000_000 if big else 1_000_000
    many = 5000 if big else 500
    out = []
    for stage in ("sft", "ppo", "rm"):
        good = base(stage)
        exp = [canon(stage, r) for r in good]
        lines = [obj_text(r) for r in good]
        f = STAGE_FIELDS[stage][-1]

        def with_value(v, rows=good):
            rows = [dict(r) for r in rows]
            rows[1][f] = v
            return rows

        def add(name, content, expected, **kw):
            out.append(DataCase(f"{stage}.jsonl~{name}", stage, ".jsonl", content, "rows", expected, **kw))

        add("crlf", jsonl_bytes(lines, nl="\r\n"), exp)
        add("crlf_with_bom", jsonl_bytes(lines, nl="\r\n", bom=True), exp)
        add("bom", jsonl_bytes(lines, bom=True), exp)
        add("blank_and_whitespace_lines", jsonl_bytes(["", lines[0], "   ", "\t", lines[1], "", lines[2], ""]), exp)
        add("no_final_newline", jsonl_bytes(lines, final_newline=False), exp)
        add("spaces_around_objects", jsonl_bytes(["  " + ln + "  " for ln in lines]), exp)
        for vname, v in [("odd_separators_raw", ODD), ("escaped_crlf_and_final_cr", "a\r\nb\r"),
                         ("emoji_zwj_combining_rtl", "\U0001f469\u200d\U0001f4bb e\u0301 \u05e9\u05dc\u05d5\u05dd"),
                         ("quotes_and_backslashes", 'say "hi" \\ \\n'),
                         ("nul_and_controls", "a\u0000b\u0001c\u001f"), ("bom_inside_value", "a\ufeffb"),
                         ("lone_cr_inside_value", "a\rb")]:
            rows = with_value(v)
            add(vname, jsonl_bytes([obj_text(r) for r in rows]), [canon(stage, r) for r in rows])
        rows = with_value(ODD)
        add("odd_separators_escaped", jsonl_bytes([json.dumps(r) for r in rows]), [canon(stage, r) for r in rows])
        rows = [dict(r, extra={"nested": [1, {"x": None}]}, score=0.5, tags=["a"]) for r in good]
        add("extra_fields_of_any_type", jsonl_bytes([obj_text(r) for r in rows]), exp)
        rows = [dict(r, **{f"col{i}": i for i in range(1000)}) for r in good]
        add("1000_extra_fields", jsonl_bytes([obj_text(r) for r in rows]), exp)
        keys = {k: ("问题" if i == 0 else f"my_{k}") for i, k in enumerate(STAGE_FIELDS[stage])}
        mapped = [{keys[k]: v for k, v in r.items()} for r in good]
        add("mapped_keys", jsonl_bytes([obj_text(r) for r in mapped]), exp, keys=keys)
        rows = [dict(good[i % 3], **{f: f"row {i}"}) for i in range(many)]
        add(f"{many}_rows", jsonl_bytes([obj_text(r) for r in rows]), [canon(stage, r) for r in rows])
        rows = with_value("x" * huge)
        add(f"value_of_{huge // 1_000_000}MB", jsonl_bytes([obj_text(r) for r in rows]),
            [canon(stage, r) for r in rows])
        add("max_samples_2", jsonl_bytes(lines), exp[:2], max_samples=2)
        add("max_samples_1_before_a_bad_row", jsonl_bytes([lines[0], "not json", lines[2]]), exp[:1], max_samples=1)
        dup = obj_text(good[1])[:-1] + f", {dumps(f)}: \"second\"" + "}"
        out.append(DataCase(f"{stage}.jsonl~duplicated_key", stage, ".jsonl", jsonl_bytes([lines[0], dup, lines[2]]),
                            "either", options=[[exp[0], dict(exp[1], **{f: "second"}), exp[2]]]))
    sft = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"}]
    out.append(DataCase("sft.jsonl~input_missing_or_null", "sft", ".jsonl", jsonl_bytes([obj_text(r) for r in sft]),
                        "rows", [canon("sft", r) for r in sft]))
    return out


def json_document_cases(big: bool) -> list[DataCase]:
    out = []
    for stage in ("ppo", "sft"):
        good = base(stage)
        exp = [canon(stage, r) for r in good]
        f = STAGE_FIELDS[stage][0]
        listed = json_list_bytes(good).decode()

        def add(name, text, expect, rows=None, where=None, options=None):
            content = text if isinstance(text, bytes) else text.encode("utf-8")
            out.append(DataCase(f"{stage}.json:{name}", stage, ".json", content, expect, rows or [], where,
                                options=options or []))

        add("pretty_list", listed, "rows", exp)
        add("compact_list", json_list_bytes(good, indent=False), "rows", exp)
        add("pretty_list_crlf", listed.replace("\n", "\r\n"), "rows", exp)
        add("pretty_list_bom", b"\xef\xbb\xbf" + listed.encode(), "rows", exp)
        add("indent_4_from_json_dump", json.dumps(good, ensure_ascii=False, indent=4), "rows", exp)
        add("train_key", dumps({"train": good}), "rows", exp)
        add("data_key_and_metadata", dumps({"version": 2, "data": good, "meta": {"n": 3}}), "rows", exp)
        add("single_object", dumps(good[0]), "rows", exp[:1])
        add("json_lines_in_a_json_file", "\n".join(dumps(r) for r in good) + "\n", "rows", exp)
        add("odd_separators", json_list_bytes([dict(r, **{f: ODD}) for r in good]), "rows",
            [dict(e, **{f: ODD}) for e in exp])
        many = 5000 if big else 500
        rows = [dict(good[i % 3], **{f: f"row {i}"}) for i in range(many)]
        add(f"{many}_rows", json_list_bytes(rows), "rows", [canon(stage, r) for r in rows])
        add("truncated_list", listed[:len(listed) * 2 // 3], "file")
        add("trailing_comma_in_list", listed[:-2] + ",\n]", "file")
        add("empty_list", "[]", "file")
        add("empty_object", "{}", "file")
        add("null", "null", "file")
        add("number", "42", "file")
        add("string", '"text"', "file")
        add("two_lists_under_keys", dumps({"train": good, "test": good}), "file")
        add("list_with_a_string_element", "[" + obj_text(good[0]) + ', "x", ' + obj_text(good[2]) + "]", "bad",
            [exp[0], None, exp[2]], "row 1")
        add("list_with_a_nested_list", listed.replace(obj_text(good[1]), "[" + obj_text(good[1]) + "]"), "bad",
            [exp[0], None, exp[2]], "row 1")
        add("unclosed_array_depth_100000", "[" * 100000, "file")
        add("unclosed_object_depth_100000", '{"a": ' * 100000, "file")
        add("trailing_garbage", listed + " xyz", "file")
        add("two_lists_concatenated", listed + listed, "file")
        add("pretty_objects_concatenated", "\n".join(json.dumps(r, indent=2, ensure_ascii=False) for r in good),
            "file")
        add("javascript_comments", "// data\n" + listed, "file")
        dup = obj_text(good[1])[:-1] + f", {dumps(f)}: \"second\"" + "}"
        add("duplicated_key", listed.replace(obj_text(good[1]), dup), "either",
            options=[[exp[0], dict(exp[1], **{f: "second"}), exp[2]]])
    return out


def csv_cases(big: bool) -> list[DataCase]:
    out = []
    huge = 20_000_000 if big else 1_000_000
    for stage, fields in STAGE_FIELDS.items():
        good = base(stage)
        exp = [canon(stage, r) for r in good]
        header = list(fields)
        vals = [[r[h] for h in header] for r in good]
        # one value per field
        for f in fields:
            i = header.index(f)
            opt = f in OPTIONAL
            for mname, v in [("empty", ""), ("whitespace", "  "), ("text_NaN", "NaN"), ("text_null", "null")]:
                rows = [list(v_) for v_ in vals]
                rows[1][i] = v
                content = csv_bytes(header, rows)
                name = f"{stage}.{f}={mname}.csv"
                if mname.startswith("text_") or opt:
                    e = [dict(x) for x in exp]
                    e[1][f] = v
                    out.append(DataCase(name, stage, ".csv", content, "rows", e))
                elif mname == "whitespace" and len(header) == 1:  # a line of spaces: a blank line or an empty value
                    out.append(DataCase(name, stage, ".csv", content, "either", options=[[exp[0], exp[2]]]))
                else:
                    out.append(DataCase(name, stage, ".csv", content, "bad", [exp[0], None, exp[2]], "line 3"))
            h2 = [h for h in header if h != f]
            content = csv_bytes(h2, [[r[h] for h in h2] for r in good])
            if opt:
                out.append(DataCase(f"{stage}.csv:no_{f}_column", stage, ".csv", content, "rows",
                                    [dict(e, input="") for e in exp]))
            else:
                out.append(DataCase(f"{stage}.csv:no_{f}_column", stage, ".csv", content, "file"))
        for suffix, d in ((".csv", ","), (".tsv", "\t")):
            def add(name, content, expect, rows=None, where=None, **kw):
                out.append(DataCase(f"{stage}{suffix}:{name}", stage, suffix, content, expect, rows or [], where, **kw))

            add("plain", csv_bytes(header, vals, d), "rows", exp)
            add("crlf", csv_bytes(header, vals, d, nl="\r\n"), "rows", exp)
            add("bom", csv_bytes(header, vals, d, bom=True), "rows", exp)
            add("cr_only_line_ends", csv_bytes(header, vals, d, nl="\r"), "rows", exp)
            add("no_final_newline", csv_bytes(header, vals, d, final_newline=False), "rows", exp)
            if len(header) > 1:
                add("row_with_a_missing_field", csv_bytes(header, [vals[0], vals[1][:-1], vals[2]], d), "bad",
                    [exp[0], None, exp[2]], "line 3")
            add("row_with_an_extra_field", csv_bytes(header, [vals[0], vals[1] + ["extra"], vals[2]], d), "bad",
                [exp[0], None, exp[2]], "line 3")
            add("header_only", csv_bytes(header, [], d), "file")
            add("empty_file", b"", "file")
            add("only_newlines", b"\n\n\r\n  \n", "file")
            e = [dict(x) for x in exp]
            multi = "line one\nline two\r\nline three \u2028 four\u0085five"
            e[1][header[-1]] = multi
            rows = [list(v_) for v_ in vals]
            rows[1][-1] = multi
            add("quoted_newlines_and_odd_separators", csv_bytes(header, rows, d), "rows", e)
            tricky = ['a, "quoted", and \t tab', '  spaced  ', '1e3', '042', 'TRUE', 'a"b', 'a\u0000b', '👩‍💻']
            for k, v in enumerate(tricky):
                e = [dict(x) for x in exp]
                e[1][header[-1]] = v
                rows = [list(v_) for v_ in vals]
                rows[1][-1] = v
                add(f"value_{k}_{v.strip()[:6].encode('ascii', 'replace').decode()}", csv_bytes(header, rows, d),
                    "rows", e)
            # a stray quote inside an unquoted value stays (the csv module's convention)
            text = csv_bytes(header, vals, d).decode().replace(vals[1][-1], f'ab"c{vals[1][-1]}', 1)
            e = [dict(x) for x in exp]
            e[1][header[-1]] = f'ab"c{vals[1][-1]}'
            add("stray_quote_inside_a_value", text.encode(), "rows", e)
            # malformed quoting
            lines = csv_bytes(header, vals + [vals[0]], d).decode().split("\n")
            lines[2] = '"' + lines[2]  # an opening quote that is never closed
            add("unterminated_quote_mid_file", "\n".join(lines).encode(), "bad", [exp[0], None, exp[2], exp[0]],
                "line 3")
            lines = csv_bytes(header, vals, d).decode().split("\n")
            lines[2] = '"' + lines[2].replace(d, '"x' + d, 1) if len(header) > 1 else '"' + lines[2] + '"x'
            add("text_after_a_closing_quote", "\n".join(lines).encode(), "bad", [exp[0], None, exp[2]], "line 3")
            # refused files
            add("semicolon_delimited", csv_bytes(header + ["id"], [v + [str(i)] for i, v in enumerate(vals)], ";"),
                "file")
            add("no_header", csv_bytes(vals[0], vals[1:], d), "file")
            add("excel_sep_line", b"sep=" + d.encode() + b"\n" + csv_bytes(header, vals, d), "file")
            dup = csv_bytes(header + [header[-1]], [v + ["second"] for v in vals], d)
            out.append(DataCase(f"{stage}{suffix}~duplicated_column", stage, suffix, dup, "either",
                                options=[[dict(x, **{header[-1]: "second"}) for x in exp]]))
        # extra columns, other order, mapped keys
        cols = list(reversed(header)) + ["id", "score"]
        rows = [[r[h] for h in reversed(header)] + [str(i), "0.5"] for i, r in enumerate(good)]
        out.append(DataCase(f"{stage}.csv:other_order_and_extra_columns", stage, ".csv", csv_bytes(cols, rows), "rows",
                            exp))
        keys = {k: f"my {k}" for k in fields}
        out.append(DataCase(f"{stage}.csv:mapped_keys", stage, ".csv", csv_bytes([keys[h] for h in header], vals),
                            "rows", exp, keys=keys))
        many = 5000 if big else 500
        rows = [[f"{v} {i}" for v in vals[i % 3]] for i in range(many)]
        out.append(DataCase(f"{stage}.csv:{many}_rows", stage, ".csv", csv_bytes(header, rows), "rows",
                            [dict(zip(header, r)) for r in rows]))
        rows = [list(v_) for v_ in vals]
        rows[1][-1] = "x" * huge
        e = [dict(x) for x in exp]
        e[1][header[-1]] = "x" * huge
        out.append(DataCase(f"{stage}.csv:unquoted_value_of_{huge // 1_000_000}MB", stage, ".csv",
                            csv_bytes(header, rows), "rows", e))
        rows[1][-1] = "y, " * 70_000  # 210 KB: quoted (it holds the delimiter)
        e = [dict(x) for x in exp]
        e[1][header[-1]] = "y, " * 70_000
        out.append(DataCase(f"{stage}.csv:quoted_value_of_210KB", stage, ".csv", csv_bytes(header, rows), "rows", e))
    return out


def parquet_cases(big: bool) -> list[DataCase]:
    out = []

    def pa_array(values, kind):
        def build():
            import pyarrow as pa

            if kind == "large_string":
                return pa.array(values, pa.large_string())
            if kind == "dictionary":
                return pa.array(values, pa.string()).dictionary_encode()
            if kind == "binary":
                return pa.array([v.encode() for v in values], pa.binary())
            if kind == "float_nan":
                return pa.array([float("nan")] * len(values), pa.float64())
            return pa.array(values)

        return build

    for stage, fields in STAGE_FIELDS.items():
        good = base(stage)
        exp = [canon(stage, r) for r in good]
        cols = columns_of(good)
        for f in fields:
            opt = f in OPTIONAL
            vals = cols[f]
            muts = [("null", [vals[0], None, vals[2]], "row1", ""), ("empty", [vals[0], "", vals[2]], "row1", ""),
                    ("whitespace", [vals[0], "  ", vals[2]], "row1", "  "),
                    ("int_column", [1, 2, 3], "all", None), ("float_column_all_nan", pa_array(vals, "float_nan"),
                                                             "all", ""),
                    ("bool_column", [True, False, True], "all", None),
                    ("list_column", [[v] for v in vals], "all", None),
                    ("struct_column", [{"text": v} for v in vals], "all", None),
                    ("binary_column", pa_array(vals, "binary"), "all", None),
                    ("large_string_column", pa_array(vals, "large_string"), "valid", None),
                    ("dictionary_column", pa_array(vals, "dictionary"), "valid", None),
                    ("column_missing", MISSING, "all", "")]
            for mname, column, scope, loaded_if_opt in muts:
                c = dict(cols)
                if column is MISSING:
                    del c[f]
                else:
                    c[f] = column
                name = f"{stage}.{f}={mname}.parquet"
                write = parquet_writer(c)
                if scope == "valid":
                    out.append(DataCase(name, stage, ".parquet", write, "rows", exp))
                elif opt and loaded_if_opt is not None:
                    e = [dict(x) for x in exp]
                    for k in ([1] if scope == "row1" else range(3)):
                        e[k][f] = loaded_if_opt
                    out.append(DataCase(name, stage, ".parquet", write, "rows", e))
                elif scope == "row1":
                    out.append(DataCase(name, stage, ".parquet", write, "bad", [exp[0], None, exp[2]], "row 1"))
                else:
                    out.append(DataCase(name, stage, ".parquet", write, "file"))
        many = 5000 if big else 500
        rows = [dict(good[i % 3], **{fields[0]: f"row {i}"}) for i in range(many)]
        out.append(DataCase(f"{stage}.parquet:{many}_rows_in_row_groups_of_2", stage, ".parquet",
                            parquet_writer(columns_of(rows)), "rows", [canon(stage, r) for r in rows]))
        c = dict(cols, id=[1, 2, 3], tags=[["a"], [], None], meta=[{"x": 1}, None, {"x": 2}])
        out.append(DataCase(f"{stage}.parquet:extra_columns_of_other_types", stage, ".parquet", parquet_writer(c),
                            "rows", exp))
        keys = {k: f"列_{k}" for k in fields}
        out.append(DataCase(f"{stage}.parquet:mapped_unicode_keys", stage, ".parquet",
                            parquet_writer({keys[k]: v for k, v in cols.items()}), "rows", exp, keys=keys))
        huge = 20_000_000 if big else 1_000_000
        c = dict(cols, **{fields[-1]: [cols[fields[-1]][0], ODD + "\u0000" + "z" * huge, cols[fields[-1]][2]]})
        e = [dict(x) for x in exp]
        e[1][fields[-1]] = ODD + "\u0000" + "z" * huge
        out.append(DataCase(f"{stage}.parquet:odd_nul_and_{huge // 1_000_000}MB_value", stage, ".parquet",
                            parquet_writer(c), "rows", e))
    ppo = columns_of(base("ppo"))

    def zero_rows(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), str(path))

    def truncated(path: Path) -> None:
        parquet_writer(ppo)(path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    out += [DataCase("ppo.parquet:zero_rows", "ppo", ".parquet", zero_rows, "file"),
            DataCase("ppo.parquet:not_parquet_bytes", "ppo", ".parquet", b"not parquet at all", "file"),
            DataCase("ppo.parquet:empty_file", "ppo", ".parquet", b"", "file"),
            DataCase("ppo.parquet:csv_text_named_parquet", "ppo", ".parquet", b"prompt\nhello\n", "file"),
            DataCase("ppo.parquet:cut_in_half", "ppo", ".parquet", truncated, "file"),
            DataCase("ppo.PARQUET:upper_case_suffix", "ppo", ".PARQUET", parquet_writer(ppo), "rows",
                     [canon("ppo", r) for r in base("ppo")])]
    return out


def encoding_cases() -> list[DataCase]:
    out = []
    row = {"prompt": "café – “naïve” ±"}
    bodies = {".jsonl": lambda r: dumps(r) + "\n" + dumps({"prompt": "plain"}) + "\n",
              ".json": lambda r: json.dumps([r, {"prompt": "plain"}], ensure_ascii=False, indent=1),
              ".csv": lambda r: f'prompt\n"{r["prompt"]}"\nplain\n',
              ".tsv": lambda r: f'prompt\n{r["prompt"]}\nplain\n'}
    for suffix, body in bodies.items():
        text = body(row)
        variants = {
            "latin1": text.encode("latin-1", "replace"),
            "cp1252_smart_quotes": text.encode("cp1252", "replace"),
            "utf16_le_with_bom": text.encode("utf-16"),
            "utf16_be_with_bom": b"\xfe\xff" + text.encode("utf-16-be"),
            "utf16_le_without_bom": text.encode("utf-16-le"),
            "utf32_with_bom": text.encode("utf-32"),
            "cesu8_surrogate_bytes": text.encode().replace("–".encode(), b"\xed\xa0\x80"),
            "overlong_utf8": text.encode().replace(b"plain", b"pl\xc0\xafin"),
            "cut_mid_character": text.encode()[:text.encode().index("–".encode()) + 1],
            "binary_garbage": bytes((i * 7919 + 13) % 256 for i in range(4096)),
            "one_bad_byte_in_row_2": text.encode().replace(b"plain", b"pl\xffin"),
            "double_bom": b"\xef\xbb\xbf\xef\xbb\xbf" + text.encode(),
        }
        for vname, content in variants.items():
            if vname == "double_bom" and suffix == ".jsonl":
                out.append(DataCase(f"ppo{suffix}:{vname}", "ppo", suffix, content, "bad", [None, {"prompt": "plain"}],
                                    "line 1"))
            else:
                out.append(DataCase(f"ppo{suffix}:{vname}", "ppo", suffix, content, "file"))
    return out


def misc_cases() -> list[DataCase]:
    good = jsonl_bytes([dumps(r) for r in base("ppo")])
    exp = [canon("ppo", r) for r in base("ppo")]

    def mkdir(path: Path) -> None:
        path.mkdir()

    def shards(path: Path) -> None:
        path.mkdir()
        (path / "part-0.jsonl").write_bytes(good)
        (path / "part-1.jsonl").write_bytes(good)

    def symlink(path: Path) -> None:
        target = path.with_name(path.name + ".target.jsonl")
        target.write_bytes(good)
        path.symlink_to(target)

    def saved(rows, dict_splits=None, empty=False):
        def write(path: Path) -> None:
            import datasets

            datasets.disable_progress_bars()
            if empty:
                ds = datasets.Dataset.from_dict({"prompt": []}, features=datasets.Features(
                    {"prompt": datasets.Value("string")}))
            else:
                ds = datasets.Dataset.from_list(rows)
            if dict_splits:
                datasets.DatasetDict({s: ds for s in dict_splits}).save_to_disk(str(path))
            else:
                ds.save_to_disk(str(path))

        return write

    return [
        DataCase("ppo:nonexistent_path", "ppo", ".jsonl", None, "file"),
        DataCase("ppo:txt_suffix", "ppo", ".txt", good, "file"),
        DataCase("ppo:xlsx_suffix", "ppo", ".xlsx", b"PK\x03\x04" + b"\x00" * 60, "file"),
        DataCase("ppo:yaml_suffix", "ppo", ".yaml", b"- prompt: hi\n", "file"),
        DataCase("ppo:gzipped_jsonl", "ppo", ".jsonl.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 40, "file"),
        DataCase("ppo:no_suffix", "ppo", "", good, "file"),
        DataCase("ppo:upper_case_JSONL_suffix", "ppo", ".JSONL", good, "rows", exp),
        DataCase("ppo:spaces_and_unicode_in_the_file_name", "ppo", " — dätä file.jsonl", good, "rows", exp),
        DataCase("ppo:symlink_to_a_file", "ppo", ".jsonl", symlink, "rows", exp),
        DataCase("ppo:empty_directory", "ppo", "", mkdir, "file"),
        DataCase("ppo:directory_named_like_a_file", "ppo", ".jsonl", mkdir, "file"),
        DataCase("ppo:directory_of_jsonl_shards", "ppo", "", shards, "file"),
        DataCase("ppo:empty_jsonl", "ppo", ".jsonl", b"", "file"),
        DataCase("ppo:blank_lines_only_jsonl", "ppo", ".jsonl", b"\n\r\n   \n\t\n", "file"),
        DataCase("ppo:empty_json", "ppo", ".json", b"", "file"),
        DataCase("ppo:whitespace_only_json", "ppo", ".json", b"  \n\t ", "file"),
        DataCase("ppo:saved_dataset", "ppo", "", saved(base("ppo")), "rows", exp),
        DataCase("ppo:saved_dataset_dict_with_train", "ppo", "", saved(base("ppo"), ["train", "test"]), "rows", exp),
        DataCase("ppo:saved_dataset_dict_without_train", "ppo", "", saved(base("ppo"), ["validation"]), "file"),
        DataCase("ppo:saved_dataset_zero_rows", "ppo", "", saved([], empty=True), "file"),
        DataCase("ppo:saved_dataset_int_column", "ppo", "", saved([{"prompt": 1}, {"prompt": 2}]), "file"),
        DataCase("ppo:saved_dataset_null_in_row_1", "ppo", "",
                 saved([{"prompt": "a"}, {"prompt": None}, {"prompt": "c"}]), "bad",
                 [{"prompt": "a"}, None, {"prompt": "c"}], "row 1"),
        DataCase("sft:saved_dataset_with_mapped_keys", "sft", "",
                 saved([{"q": "a", "a": "b"}, {"q": "c", "a": "d"}]), "rows",
                 [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": "d"}],
                 keys={"instruction": "q", "output": "a"}),
        DataCase("rm:mapped_key_that_is_missing", "rm", ".jsonl", jsonl_bytes([dumps(r) for r in base("rm")]),
                 "file", keys={"chosen": "better"}),
    ]


def loader_cases(quick: bool) -> list[DataCase]:
    big = not quick
    cases = (value_cases(big) + structural_jsonl_cases() + tricky_jsonl_cases(big) + json_document_cases(big)
             + csv_cases(big) + parquet_cases(big) + encoding_cases() + misc_cases())
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    if not quick:
        return cases
    seen, picked = set(), []
    for i, c in enumerate(cases):  # every kind of case once (its name less the stage and field), and a third
        kind = c.name.split("=", 1)[-1] if "=" in c.name else c.name.split(".", 1)[-1].split(":", 1)[-1]
        if kind not in seen or i % 3 == 0:
            picked.append(c)
        seen.add(kind)
    return picked


# ---- the worker: one process that imports the loader once and loads one file per request

WORKER = """
import json, os, sys, traceback
proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies
import logging
logging.disable(logging.WARNING)
import datasets
datasets.disable_progress_bars()
from coati_ray.data import loading
from coati_ray.errors import CoatiError
COLUMNS = {"sft": loading.sft_columns, "rm": loading.pair_columns, "ppo": loading.prompt_columns}
proto.write('{"ready": true}\\n'); proto.flush()
for line in sys.stdin:
    req = json.loads(line)
    try:
        got = loading.load_rows(req["path"], COLUMNS[req["stage"]](req["keys"]), req["skip"], req["max_samples"])
        reply = {"kind": "loaded", "rows": list(got.dataset), "skipped": list(got.skipped)}
    except Exception as e:
        reply = {"kind": "error", "coati": isinstance(e, CoatiError), "type": type(e).__name__, "message": str(e),
                 "traceback": traceback.format_exc()[-4000:]}
    proto.write(json.dumps(reply) + "\\n"); proto.flush()
"""


class LoaderWorker:
    """A child process running WORKER; `load()` bounds each request, and a worker that hangs or dies
    is killed and replaced."""

    def __init__(self, tmp: Path, start_timeout_s: float = 120.0):
        self.tmp, self.start_timeout_s = tmp, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def start(self) -> None:
        env = dict(os.environ, HF_DATASETS_CACHE=str(self.tmp / "hf_datasets_cache"), TOKENIZERS_PARALLELISM="false",
                   HF_DATASETS_DISABLE_PROGRESS_BARS="1")
        self.log = open(self.tmp / "loader_worker.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=ROOT)
        self.buf = b""
        reply = self._read(self.start_timeout_s)
        if not (isinstance(reply, dict) and reply.get("ready")):
            raise RuntimeError(f"the loader worker did not start within {self.start_timeout_s} s: {reply}; "
                               f"see {self.tmp / 'loader_worker.log'}")

    def _read(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return "hang"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return "died"
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def load(self, path: Path, case: DataCase, skip: bool, timeout_s: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        req = {"path": str(path), "stage": case.stage, "keys": case.keys, "skip": skip,
               "max_samples": case.max_samples}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        reply = self._read(timeout_s)
        if isinstance(reply, dict):
            return reply
        code = self.stop()
        return {"kind": reply, "exit": code}

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(timeout=30)
        self.proc = None
        self.log.close()
        return code


def unclear(message: str, path: str, where: str | None, row_level: bool) -> str | None:
    """Why a CoatiError's message is not a clear one (None when it is)."""
    if "\n" in message or "\r" in message:
        return "more than one line"
    if path not in message:
        return "does not name the file"
    if where is not None and where not in message:
        return f"does not name {where!r}"
    if row_level and not any(w in message for w in ("line ", "row ", "field ")):
        return "names no line, row or field"
    return None


def first_difference(got: list, want: list) -> str:
    if len(got) != len(want):
        return f"{len(got)} rows loaded, {len(want)} expected"
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"row {i}: loaded {clip(g, 300)}, expected {clip(w, 300)}"
    return "same rows"


def judge_load(case: DataCase, skip: bool, path: str, reply: dict) -> tuple[str, str, bool]:
    """(outcome, detail, valid input refused)."""
    kind = reply["kind"]
    if kind == "hang":
        return "hang", "no answer within the time bound (worker killed)", False
    if kind == "died":
        return "traceback", f"the loader process died (exit {reply.get('exit')})", False
    n_bad = sum(r is None for r in case.rows)
    goods = [r for r in case.rows if r is not None]
    if kind == "error":
        msg = reply["message"]
        if not reply["coati"]:
            return "traceback", f"{reply['type']}: {clip(msg, 300)}\n{reply['traceback'][-700:]}", False
        row_level = case.expect == "bad" and not skip
        problem = unclear(msg, path, case.where if row_level else None, row_level)
        if problem:
            return "traceback", f"unclear {reply['type']} ({problem}): {clip(msg, 400)}", False
        return "clear", clip(msg, 300), case.expect == "rows"
    rows, skipped = reply["rows"], reply["skipped"]
    if case.expect == "rows":
        want = case.rows[:case.max_samples] if case.max_samples else case.rows
        if rows == want and not skipped:
            return "ok", f"{len(rows)} rows", False
        return "lost", f"{first_difference(rows, want)}; {len(skipped)} skipped: {clip(skipped, 300)}", False
    if case.expect == "either":
        if rows in case.options:
            return "ok", f"{len(rows)} rows, {len(skipped)} skipped (one of the accepted readings)", False
        return "lost", f"{first_difference(rows, case.options[0])}; {len(skipped)} skipped", False
    if case.expect == "file":
        return "lost", f"loaded {len(rows)} rows ({len(skipped)} skipped) from a file that must be refused: " \
                       f"{clip(rows, 300)}", False
    if not skip:
        return "lost", f"loaded {len(rows)} rows without an error; the file has {n_bad} bad row(s): " \
                       f"{first_difference(rows, goods)}", False
    if rows == goods and len(skipped) == n_bad:
        return "ok", f"{len(rows)} loaded + {len(skipped)} skipped = {len(case.rows)} written", False
    return "lost", f"{len(rows)} loaded + {len(skipped)} skipped, {len(case.rows)} written ({len(goods)} good): " \
                   f"{first_difference(rows, goods)}", False


def case_path(root: Path, i: int, case: DataCase) -> Path:
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-=~") else "_" for ch in case.name)[:60]
    return root / f"{i:04d}_{safe}{case.suffix}"


def write_case(path: Path, case: DataCase) -> None:
    if case.content is None:
        return
    if callable(case.content):
        case.content(path)
    else:
        path.write_bytes(case.content)


def run_loaders(tmp: Path, quick: bool, timeout_s: float, log: Callable[[str], None],
                keep: Callable[[str], bool]) -> list[Result]:
    cases = [c for c in loader_cases(quick) if keep(c.name)]
    root = tmp / "loaders"
    root.mkdir()
    worker = LoaderWorker(tmp)
    results = []
    try:
        for i, case in enumerate(cases):
            path = case_path(root, i, case)
            write_case(path, case)
            for skip in (False, True):
                t0 = time.monotonic()
                reply = worker.load(path, case, skip, timeout_s)
                outcome, detail, refused = judge_load(case, skip, str(path), reply)
                repro = {}
                if outcome not in ("ok", "clear") or refused:
                    data = path.read_bytes() if path.is_file() else None
                    repro = {"file": path.name,
                             "bytes": (f"<{'directory' if path.is_dir() else 'missing'}>" if data is None else
                                       f"{len(data)} bytes: {clip(data[:1500], 700)}"),
                             "call": f"load_rows({str(path)!r}, {_columns_call(case)}, skip_bad_rows={skip}"
                                     + (f", max_samples={case.max_samples}" if case.max_samples else "") + ")",
                             "expect": case.expect}
                results.append(Result("loaders", f"{case.name} skip={skip}", outcome, detail, repro, refused,
                                      time.monotonic() - t0))
            if (i + 1) % 100 == 0:
                log(f"loaders: {i + 1}/{len(cases)} files")
    finally:
        worker.stop()
    return results


def _columns_call(case: DataCase) -> str:
    fn = {"sft": "sft_columns", "rm": "pair_columns", "ppo": "prompt_columns"}[case.stage]
    return f"{fn}({case.keys!r})"


# ====================================================================================== subprocess cases

@dataclass
class ProcCase:
    part: str
    name: str
    argv: list[str]  # after `python`
    data: tuple[str, bytes] | None = None  # (file name under the case dir, content) for launcher data cases
    markers: tuple[str, ...] = ()  # stderr text that means the bad input was taken (the case is ended there)
    grace_s: float = 0.0  # after a marker, how long the command may still take to exit on its own
    timeout_s: float = 120.0
    names_file: bool = False  # the error line must name the data file
    extra_files: dict = field(default_factory=dict)  # more files the command reads: name under the case dir -> bytes


def launcher_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join a cluster by accident
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue
        try:  # the launcher is gone; Ray's processes in its group go too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def run_proc(case: ProcCase, workdir: Path) -> Result:
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [a.replace("{dir}", str(workdir)) for a in case.argv]
    data_path = None
    if case.data is not None:
        data_path = workdir / case.data[0]
        data_path.write_bytes(case.data[1])
    out_f, err_f = workdir / "stdout.txt", workdir / "stderr.txt"
    t0 = time.monotonic()
    with open(out_f, "wb") as out, open(err_f, "wb") as err:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=launcher_env(), start_new_session=True)
    deadline, marker, marker_at, timed_out = t0 + case.timeout_s, None, None, False
    while True:
        try:
            proc.wait(timeout=0.25)
            marker = None  # it ended on its own: judged by how
            break
        except subprocess.TimeoutExpired:
            pass
        if case.markers and marker is None:
            text = err_f.read_text(errors="replace")
            marker = next((m for m in case.markers if m in text), None)
            marker_at = time.monotonic()
        if marker is not None and time.monotonic() - marker_at >= case.grace_s:
            kill_group(proc)
            break
        if time.monotonic() > deadline:
            timed_out = True
            kill_group(proc)
            break
    kill_group(proc)  # anything it left in its process group
    seconds = time.monotonic() - t0
    stdout, stderr = out_f.read_text(errors="replace"), err_f.read_text(errors="replace")
    outcome, detail = judge_proc(proc.returncode, stdout, stderr, timed_out, marker, case, data_path)
    repro = {}
    if outcome != "clear":
        repro = {"command": "python " + " ".join(_shell_quote(a) for a in argv),
                 "exit": proc.returncode, "stderr_tail": clip(stderr[-3000:], 900)}
        if data_path is not None:
            repro["data_file"] = {"name": data_path.name, "bytes": clip(case.data[1], 700)}
    return Result(case.part, case.name, outcome, detail, repro, seconds=seconds)


def _shell_quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def judge_proc(rc: int | None, stdout: str, stderr: str, timed_out: bool, marker: str | None, case: ProcCase,
               data_path: Path | None) -> tuple[str, str]:
    if timed_out:
        return "hang", f"no exit within {case.timeout_s:.0f} s (killed)"
    if marker:
        return "lost", f"the bad input was taken: the run got as far as {marker!r} (then ended by the probe)"
    if "Traceback" in stderr or "Traceback" in stdout:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
        return "traceback", f"exit {rc}, traceback ending {clip(last[0], 300)}"
    if rc == 0:
        return "lost", "the bad input was taken: exit 0"
    errors = [ln for ln in stderr.splitlines() if "error:" in ln]
    if rc != 2:
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        return "traceback", f"unclear: exit {rc} (not 2), last line {clip(tail[0], 300)}"
    if len(errors) != 1:
        return "traceback", f"unclear: exit 2 with {len(errors)} 'error:' lines: {clip(errors, 400)}"
    if case.names_file and data_path is not None and data_path.name not in errors[0]:
        return "traceback", f"unclear: the error line does not name the file: {clip(errors[0], 300)}"
    return "clear", clip(errors[0].split("error:", 1)[1].strip(), 300)


def run_proc_cases(cases: list[ProcCase], tmp: Path, jobs: int, log: Callable[[str], None]) -> list[Result]:
    if not cases:
        return []

    def one(item):
        i, case = item
        return run_proc(case, tmp / f"{case.part}_{i:03d}")

    results = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for n, r in enumerate(pool.map(one, enumerate(cases)), start=1):
            results.append(r)
            if n % 20 == 0:
                log(f"{cases[0].part}: {n}/{len(cases)} cases")
    return results


RAY_STARTED = ("starting a local Ray", "joining Ray cluster")
SERVING = (") on http://",)  # serve.py's "serving NAME (context N tokens) on http://..." line
SERVE_GRACE_S = 10.0  # serve.py logs that line just before it binds the port


def stage12_base(script: str) -> list[str]:
    return [f"launchers/{script}", "--preset_size", "micro", "--local", "--max_steps", "1", "--batch_size", "2",
            "--eval_split", "0", "--max_samples", "16", "--save_path", "{dir}/out"]


def ppo_base(model: str) -> list[str]:
    return ["launchers/ppo_cluster.py", "--pretrain", model, "--rm_path", model, "--save_path", "{dir}/out",
            "--max_steps", "1", "--experience_batch_size", "4", "--train_batch_size", "4", "--max_new_tokens", "4"]


def launcher_cases(model: str, quick: bool) -> list[ProcCase]:
    """Bad data files through the three training launchers."""
    sft = base("sft")
    rm = base("rm")
    ppo = base("ppo")
    jl = lambda rows: jsonl_bytes([obj_text(r) for r in rows])  # noqa: E731
    bad_sft = [sft[0], dict(sft[1], output=MISSING)]
    cases: list[tuple[str, str, str, bytes, list[str]]] = [
        ("train_sft.py", "truncated_json_line", "d.jsonl", jsonl_bytes([obj_text(sft[0]), obj_text(sft[1])[:20]]), []),
        ("train_sft.py", "missing_output_field", "d.jsonl", jl(bad_sft), []),
        ("train_sft.py", "lone_surrogate", "d.jsonl", jl([sft[0], dict(sft[1], output=Raw('"x\\ud800"'))]), []),
        ("train_sft.py", "int_5000_digits", "d.jsonl", jl([sft[0], dict(sft[1], output=Raw("9" * 5000))]), []),
        ("train_sft.py", "nested_too_deep", "d.jsonl", jsonl_bytes([obj_text(sft[0]), "[" * 100000]), []),
        ("train_sft.py", "utf16_file", "d.json", json.dumps(sft).encode("utf-16"), []),
        ("train_sft.py", "empty_file", "d.jsonl", b"", []),
        ("train_sft.py", "header_only_csv", "d.csv", b"instruction,input,output\n", []),
        ("train_sft.py", "unterminated_csv_quote", "d.csv",
         b'instruction,input,output\nAdd 2 and 3.,,5\n"Solve.,x,y\nSay hi.,,Hi\n', []),
        ("train_sft.py", "txt_suffix", "d.txt", jl(sft), []),
        ("train_sft.py", "bad_eval_file", "e.jsonl", jl(bad_sft), ["--eval_dataset", "{dir}/e.jsonl", "--dataset",
                                                                   "{dir}/good.jsonl"]),
        ("train_sft.py", "all_rows_bad_with_skip", "d.jsonl", jl([dict(r, output=MISSING) for r in sft]),
         ["--skip_bad_rows"]),
        ("train_sft.py", "mapped_key_missing", "d.jsonl", jl(sft), ["--output_key", "answer"]),
        ("train_reward_model.py", "missing_rejected", "d.jsonl", jl([rm[0], dict(rm[1], rejected=MISSING)]), []),
        ("train_reward_model.py", "truncated_json_list", "d.json", json_list_bytes(rm)[:60], []),
        ("train_reward_model.py", "lone_surrogate_in_json_list", "d.json",
         json_list_bytes([rm[0], dict(rm[1], chosen=Raw('"\\udfff"'))]), []),
        ("train_reward_model.py", "not_utf8", "d.csv", "prompt,chosen,rejected\nq,ä,ö\n".encode("latin-1"), []),
        ("train_reward_model.py", "deep_json_document", "d.json", b'{"a": ' * 100000, []),
        ("train_reward_model.py", "directory_not_a_dataset", "d.jsonl", b"", []),  # replaced by a directory below
        ("ppo_cluster.py", "missing_prompt", "p.jsonl", jl([ppo[0], {"question": "2 + 2?"}]), []),
        ("ppo_cluster.py", "list_prompt", "p.jsonl", jl([ppo[0], {"prompt": ["a", "b"]}]), []),
        ("ppo_cluster.py", "unterminated_csv_quote", "p.csv", b'prompt\nWhat is 7 x 6?\n"Name a colour.\n1 + 1?\n', []),
        ("ppo_cluster.py", "empty_file", "p.jsonl", b"\n\n", []),
        ("ppo_cluster.py", "lone_surrogate", "p.jsonl", jl([ppo[0], {"prompt": Raw('"a\\ud800"')}]), []),
        ("ppo_cluster.py", "int_5000_digits", "p.jsonl", jl([ppo[0], {"prompt": Raw("5" * 5000)}]), []),
        ("ppo_cluster.py", "corrupt_parquet", "p.parquet", b"PAR1 not really", []),
        ("ppo_cluster.py", "mapped_key_missing", "p.jsonl", jl(ppo), ["--prompt_key", "question"]),
        ("ppo_cluster.py", "prompts_given_twice", "p.jsonl", jl(ppo), ["--prompt_dataset", "{dir}/other.jsonl"]),
    ]
    out = []
    for script, name, fname, content, extra in cases:
        if script == "ppo_cluster.py":
            argv = ppo_base(model) + ["{dir}/" + fname] + extra
            markers = RAY_STARTED
        else:
            data_flag = [] if "--dataset" in extra else ["--dataset", "{dir}/" + fname]
            argv = stage12_base(script) + data_flag + extra
            markers = ()
        extra = {"good.jsonl": jl(sft), "other.jsonl": jl(ppo)}
        if name == "directory_not_a_dataset":  # a folder of JSON lines shards, not a saved dataset
            argv = [a.replace(fname, "shards") for a in argv]
            out.append(ProcCase("launchers", f"{script}:{name}", argv, None, markers,
                                extra_files={"shards/part-0.jsonl": jl(rm), "shards/part-1.jsonl": jl(rm)}))
            continue
        out.append(ProcCase("launchers", f"{script}:{name}", argv, (fname, content), markers, names_file=True,
                            extra_files=extra))
    if not quick:  # the same refusal when the data is read inside Ray actors (slower: Ray starts)
        ray_sft = [a for a in stage12_base("train_sft.py") if a != "--local"] + ["--dataset", "{dir}/d.jsonl"]
        out.append(ProcCase("launchers", "train_sft.py:missing_output_field_read_in_a_ray_actor", ray_sft,
                            ("d.jsonl", jl(bad_sft)), timeout_s=240, names_file=True))
        ptx = ppo_base(model) + ["--ptx_coef", "0.5", "--pretrain_dataset", "{dir}/t.jsonl", "--actors", "1"]
        out.append(ProcCase("launchers", "ppo_cluster.py:bad_pretrain_dataset_read_in_a_ray_actor", ptx,
                            ("t.jsonl", jl([{"text": "fine"}, {"txt": "no text field"}])), timeout_s=300,
                            names_file=True))
    return out


def flag_cases(model: str, quick: bool, busy_port: int) -> list[ProcCase]:
    """Bad flags to every launcher: its base arguments, then the bad flag (argparse: the last value wins).
    Q marks the cases of --quick (the cheap ones, and one of each kind of check)."""
    q = True
    sft, rm = stage12_base("train_sft.py"), stage12_base("train_reward_model.py")
    ppo, control = ppo_base(model), ["launchers/control.py"]
    serve = ["launchers/serve.py", model, "--port", "0"]
    demo = ["launchers/demo.py", "--preset_size", "micro", "--out", "{dir}/demo"]
    value_flag = {"serve.py": "--port", "control.py": "--generators"}
    spec: list[tuple[list[str], str, list[str], bool]] = []
    for script, b in (("train_sft.py", sft), ("train_reward_model.py", rm), ("ppo_cluster.py", ppo),
                      ("serve.py", serve), ("control.py", control), ("demo.py", demo)):
        spec += [(b, f"{script}:unknown_flag", ["--not_a_flag"], q),
                 (b, f"{script}:flag_without_its_value", [value_flag.get(script, "--seed")], q)]
    seed = str(2 ** 64)
    spec += [(sft, "train_sft.py:" + n, a, k) for n, a, k in [
        ("int_flag_abc", ["--trainers", "abc"], q), ("lr_nan", ["--lr", "nan"], q),
        ("batch_size_negative", ["--batch_size", "-4"], False), ("strategy_zero9", ["--strategy", "zero9"], q),
        ("dtype_fp16", ["--dtype", "fp16"], q), ("pretrain_nonexistent", ["--pretrain", "/nonexistent/model"], False),
        ("model_family_mismatch", ["--model", "gpt2", "--pretrain", model], False),
        ("dataset_nonexistent", ["--dataset", "{dir}/nope.jsonl"], False),
        ("resume_not_a_checkpoint", ["--resume", "{dir}"], False),
        ("resume_nonexistent", ["--resume", "/nonexistent/ckpt"], False), ("seed_2_pow_64", ["--seed", seed], False),
        ("local_with_2_trainers", ["--trainers", "2"], False),
        ("save_path_is_a_file", ["--save_path", "{dir}/a_file"], False)]]
    spec += [(rm, "train_reward_model.py:" + n, a, k) for n, a, k in [
        ("int_flag_abc", ["--batch_size", "abc"], q), ("loss_fn_hinge", ["--loss_fn", "hinge"], q),
        ("pretrain_nonexistent", ["--pretrain", "/nonexistent/model"], False),
        ("resume_not_a_checkpoint", ["--resume", "{dir}"], False), ("seed_2_pow_64", ["--seed", seed], False)]]
    spec += [(ppo, "ppo_cluster.py:" + n, a, k) for n, a, k in [
        ("kl_coef_inf", ["--kl_coef", "inf"], False),
        ("grpo_with_one_sample", ["--advantage_estimator", "grpo"], False),
        ("batch_does_not_divide", ["--experience_batch_size", "6", "--train_batch_size", "4"], False),
        ("rm_path_nonexistent", ["--rm_path", "/nonexistent/rm"], False),
        ("resume_not_a_checkpoint", ["--resume", "{dir}"], q),
        ("custom_resources_not_json", ["--custom_resources", "{bad json"], False),
        ("actors_64", ["--actors", "64"], False),
        ("generator_backend_tgi", ["--generator_backend", "tgi"], q),
        ("pretrain_dataset_nonexistent", ["--ptx_coef", "0.5", "--pretrain_dataset", "/nonexistent/t.jsonl"], False),
        ("prompt_dataset_nonexistent", ["--prompt_dataset", "/nonexistent/p.jsonl"], False),
        ("seed_2_pow_64", ["--seed", seed], False)]]
    spec += [(serve, "serve.py:" + n, a, k) for n, a, k in [
        ("port_abc", ["--port", "abc"], q), ("port_70000", ["--port", "70000"], False),
        ("port_in_use", ["--port", str(busy_port)], False), ("max_body_bytes_0", ["--max_body_bytes", "0"], False),
        ("context_len_0", ["--context_len", "0"], False), ("context_len_negative", ["--context_len", "-5"], False),
        ("quant_3bit", ["--quant", "3bit"], q), ("quant_without_checkpoint", ["--quant", "4bit"], False),
        ("backend_tgi", ["--backend", "tgi"], q)]]
    spec += [(["launchers/serve.py", path, "--port", "0"], f"serve.py:{n}", [], k) for n, path, k in [
        ("model_nonexistent", "/nonexistent/model", False), ("model_empty_directory", "{dir}/empty", False)]]
    spec += [(control, "control.py:" + n, a, k) for n, a, k in [
        ("generators_0", ["--generators", "0"], q), ("nothing_asked", [], q),
        ("status_at_an_address_with_nothing", ["--status", "--address", "127.0.0.1:1"], False)]]
    spec += [(demo, "demo.py:" + n, a, k) for n, a, k in [
        ("trainers_0", ["--trainers", "0"], False), ("preset_size_huge", ["--preset_size", "huge"], q),
        ("ppo_lr_nan", ["--ppo_lr", "nan"], False), ("sft_lr_inf", ["--sft_lr", "inf"], False)]]
    out = []
    for base_args, name, args, in_quick in spec:
        if quick and not in_quick:
            continue
        serving = base_args[0].endswith("serve.py")
        # a bad flag must be refused before the run starts: Ray starting (--local runs none), or the server
        # saying it serves and still running SERVE_GRACE_S later, means it was taken
        out.append(ProcCase("flags", name, base_args + args, markers=SERVING if serving else RAY_STARTED,
                            grace_s=SERVE_GRACE_S if serving else 0.0,
                            timeout_s=60.0 if "address_with_nothing" in name else 120.0))
    return out


def prepare_proc_case_files(cases: list[ProcCase], tmp: Path) -> None:
    """Each case's directory with the files and folders its command names: extra_files, an empty folder
    `empty`, a plain file `a_file`."""
    for i, case in enumerate(cases):
        d = tmp / f"{case.part}_{i:03d}"
        (d / "empty").mkdir(parents=True, exist_ok=True)
        (d / "a_file").write_bytes(b"not a directory\n")
        for name, content in case.extra_files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(content)


# ====================================================================================== server

KEY = "probe-key-123"
CHAT = {"model": "probe", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 2}
COMPLETION = {"model": "probe", "prompt": "The answer is", "max_tokens": 2}


@dataclass
class HttpCase:
    name: str
    path: str
    body: bytes | dict | str | None
    method: str = "POST"
    headers: dict = field(default_factory=dict)  # overrides; a None value drops the header
    chunked: bool = False
    size: int | None = None  # a generated body of this many bytes, sent in 64 KiB pieces


def http_cases() -> list[HttpCase]:
    c, p = "/v1/chat/completions", "/v1/completions"
    msg = lambda content: {**CHAT, "messages": [{"role": "user", "content": content}]}  # noqa: E731
    cases = [
        HttpCase("malformed_json", c, '{"model": "probe", "messages": ['),
        HttpCase("empty_body", c, b""),
        HttpCase("body_null", c, "null"), HttpCase("body_list", c, "[1, 2]"), HttpCase("body_string", c, '"hi"'),
        HttpCase("body_number", p, "42"),
        HttpCase("missing_model", c, {k: v for k, v in CHAT.items() if k != "model"}),
        HttpCase("missing_messages", c, {k: v for k, v in CHAT.items() if k != "messages"}),
        HttpCase("missing_prompt", p, {k: v for k, v in COMPLETION.items() if k != "prompt"}),
        HttpCase("model_is_a_number", c, {**CHAT, "model": 7}),
        HttpCase("unknown_model", c, {**CHAT, "model": "gpt-5"}),
        HttpCase("messages_not_a_list", c, {**CHAT, "messages": "hi"}),
        HttpCase("messages_empty", c, {**CHAT, "messages": []}),
        HttpCase("message_without_role", c, {**CHAT, "messages": [{"content": "hi"}]}),
        HttpCase("role_wizard", c, {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}),
        HttpCase("content_is_a_number", c, msg(5)),
        HttpCase("content_null", c, msg(None)),
        HttpCase("lone_surrogate_in_content", c, '{"model": "probe", "max_tokens": 2, "messages": '
                                                 '[{"role": "user", "content": "a \\ud800 b"}]}'),
        HttpCase("lone_surrogate_in_prompt", p, '{"model": "probe", "prompt": "x\\udc80", "max_tokens": 2}'),
        HttpCase("lone_surrogate_in_stop", c, '{"model": "probe", "max_tokens": 2, "stop": ["\\udfff"], '
                                              '"messages": [{"role": "user", "content": "hi"}]}'),
        HttpCase("empty_prompt", p, {**COMPLETION, "prompt": ""}),
        HttpCase("max_tokens_0", c, {**CHAT, "max_tokens": 0}),
        HttpCase("max_tokens_negative", p, {**COMPLETION, "max_tokens": -5}),
        HttpCase("max_tokens_10_pow_12", c, {**CHAT, "max_tokens": 10 ** 12}),
        HttpCase("max_tokens_text", c, {**CHAT, "max_tokens": "many"}),
        HttpCase("max_tokens_1.5", p, {**COMPLETION, "max_tokens": 1.5}),
        HttpCase("max_tokens_5000_digits", c, '{"model": "probe", "max_tokens": ' + "9" * 5000
                 + ', "messages": [{"role": "user", "content": "hi"}]}'),
        HttpCase("temperature_negative", c, {**CHAT, "temperature": -1}),
        HttpCase("temperature_NaN", c, '{"model": "probe", "temperature": NaN, "max_tokens": 2, '
                                       '"messages": [{"role": "user", "content": "hi"}]}'),
        HttpCase("temperature_1e999", p, '{"model": "probe", "prompt": "hi", "temperature": 1e999}'),
        HttpCase("top_p_0", p, {**COMPLETION, "top_p": 0}),
        HttpCase("top_p_Infinity", c, '{"model": "probe", "top_p": Infinity, "max_tokens": 2, '
                                      '"messages": [{"role": "user", "content": "hi"}]}'),
        HttpCase("seed_2_pow_64", c, {**CHAT, "seed": 2 ** 64}),
        HttpCase("seed_minus_2_pow_63_minus_1", p, {**COMPLETION, "seed": -(2 ** 63) - 1}),
        HttpCase("seed_10_pow_30", c, {**CHAT, "seed": 10 ** 30}),
        HttpCase("seed_text", c, {**CHAT, "seed": "lucky"}),
        HttpCase("n_2", c, {**CHAT, "n": 2}),
        HttpCase("n_0", p, {**COMPLETION, "n": 0}),
        HttpCase("stop_is_a_number", c, {**CHAT, "stop": 5}),
        HttpCase("stop_list_of_numbers", p, {**COMPLETION, "stop": [1, 2]}),
        HttpCase("stream_with_bad_max_tokens", c, {**CHAT, "stream": True, "max_tokens": 0}),
        HttpCase("prompt_of_1MB", p, {**COMPLETION, "prompt": "many words " * 100_000}),
        HttpCase("10000_messages", c, {**CHAT, "messages": [{"role": "user", "content": "hi"}] * 10_000}),
        HttpCase("json_nested_100000_deep", c, '{"model": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        HttpCase("latin1_body", c, '{"model": "probe", "max_tokens": 2, "messages": [{"role": "user", '
                                   '"content": "café"}]}'.encode("latin-1")),
        HttpCase("content_type_text_plain", c, CHAT, headers={"Content-Type": "text/plain"}),
        HttpCase("no_content_type", c, CHAT, headers={"Content-Type": None}),
        HttpCase("content_length_not_a_number", c, CHAT, headers={"Content-Length": "abc"}),
        HttpCase("wrong_api_key", c, CHAT, headers={"Authorization": "Bearer nope"}),
        HttpCase("no_api_key", p, COMPLETION, headers={"Authorization": None}),
        HttpCase("basic_auth_instead_of_bearer", c, CHAT, headers={"Authorization": "Basic dXNlcjpwYXNz"}),
        HttpCase("host_evil_example", c, CHAT, headers={"Host": "evil.example"}),
        HttpCase("host_ours_with_another_port", c, CHAT, headers={"Host": "127.0.0.1:1"}),
        HttpCase("host_empty", c, CHAT, headers={"Host": ""}),
        HttpCase("get_on_a_post_route", c, None, method="GET"),
        HttpCase("unknown_route", "/v1/nothing", CHAT),
        HttpCase("body_of_50MB_with_content_length", c, None, size=50_000_000),
        HttpCase("body_of_50MB_chunked", p, None, size=50_000_000, chunked=True),
    ]
    return cases


def _recv(sock: socket.socket, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no complete answer in time")
    ready, _, _ = select.select([sock], [], [], left)
    if not ready:
        raise TimeoutError("no complete answer in time")
    return sock.recv(1 << 16)


def read_response(sock: socket.socket, deadline: float) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock, deadline)
        if not chunk:
            raise ConnectionError(f"connection closed {'mid-header' if data else 'without an answer'}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = _recv(sock, deadline)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:n]
    while True:  # chunked or until close
        if headers.get("transfer-encoding") == "chunked" and rest.endswith(b"0\r\n\r\n"):
            break
        chunk = _recv(sock, deadline)
        if not chunk:
            break
        rest += chunk
    if headers.get("transfer-encoding") == "chunked":
        body, pos = b"", 0
        while True:
            end = rest.find(b"\r\n", pos)
            size = int(rest[pos:end].split(b";")[0] or b"0", 16) if end >= 0 else 0
            if size == 0:
                break
            body += rest[end + 2:end + 2 + size]
            pos = end + 2 + size + 2
        rest = body
    return status, headers, rest


def exchange(port: int, case: HttpCase, timeout_s: float) -> tuple[int, dict, bytes]:
    if case.size is not None:
        piece = b"x" * 65536
        n_pieces = -(-case.size // len(piece))
        body_chunks = ((f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if case.chunked else piece
                       for _ in range(n_pieces))
        length = None if case.chunked else n_pieces * len(piece)
    else:
        body = case.body
        if isinstance(body, dict):
            body = json.dumps(body)
        body = body.encode("utf-8") if isinstance(body, str) else (body or b"")
        body_chunks = [body] if body else []
        length = len(body)
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
               "Connection": "close"}
    if case.chunked:
        headers["Transfer-Encoding"] = "chunked"
    elif case.method == "POST":
        headers["Content-Length"] = str(length)
    headers.update(case.headers)
    head = f"{case.method} {case.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()
                                                              if v is not None) + "\r\n"
    deadline = time.monotonic() + timeout_s
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(head.encode("latin-1"))
        for chunk in body_chunks:
            ready, _, _ = select.select([s], [], [], 0)
            if ready:  # the server answered (or closed) before the whole body was sent
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            if case.chunked:
                try:
                    s.sendall(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
        return read_response(s, deadline)


def judge_http(status: int, headers: dict, body: bytes) -> tuple[str, str]:
    text = body.decode("utf-8", "replace")
    if 200 <= status < 300:
        return "lost", f"HTTP {status}: the bad request was taken: {clip(text, 300)}"
    if status >= 500:
        return "traceback", f"HTTP {status}: {clip(text, 300)}"
    if not 400 <= status < 500:
        return "traceback", f"HTTP {status}: {clip(text, 300)}"
    try:
        obj = json.loads(text)
        err = obj["error"]
        shaped = (list(obj) == ["error"] and set(err) == {"message", "type", "param", "code"}
                  and isinstance(err["message"], str) and err["message"])
    except (ValueError, TypeError, KeyError):
        shaped = False
    if not shaped or "Traceback" in text or not headers.get("content-type", "").startswith("application/json"):
        return "traceback", f"HTTP {status} without OpenAI's error body: {clip(text, 300)}"
    return "clear", f"HTTP {status} {err['code']}: {clip(err['message'], 200)}"


def run_server(tmp: Path, model: str, timeout_s: float, log: Callable[[str], None],
               keep: Callable[[str], bool]) -> list[Result]:
    from coati_ray.serve.process import ServerProcess

    server_log = tmp / "server.log"
    results = []
    t_start = time.monotonic()
    with ServerProcess(model, "--api_key", KEY, "--served_model_name", "probe", log=server_log,
                       timeout_s=180) as server:
        log(f"server: up on port {server.port} in {time.monotonic() - t_start:.1f} s")
        good = HttpCase("good_request", "/v1/chat/completions", CHAT)
        for case in [c for c in http_cases() if keep(c.name)] + [good]:
            t0 = time.monotonic()
            try:
                status, headers, body = exchange(server.port, case, timeout_s)
                outcome, detail = judge_http(status, headers, body)
            except TimeoutError as e:
                status, body, outcome, detail = None, b"", "hang", f"{e} ({timeout_s:.0f} s)"
            except (ConnectionError, OSError) as e:
                status, body, outcome, detail = None, b"", "traceback", f"{type(e).__name__}: {e}"
            if case is good:  # the server still serves after every bad request
                if status != 200:
                    results.append(Result("server", "still_serving_after_the_bad_requests", "traceback",
                                          f"a good request got {status}: {detail}"))
                continue
            repro = {}
            if outcome != "clear":
                shown = case.body if case.size is None else f"<{case.size} bytes of 'x'>"
                repro = {"request": f"{case.method} {case.path}", "headers": case.headers, "chunked": case.chunked,
                         "body": clip(json.dumps(shown) if isinstance(shown, dict) else shown, 700),
                         "status": status, "response": clip(body, 700)}
            results.append(Result("server", case.name, outcome, detail, repro, seconds=time.monotonic() - t0))
        if server.proc.poll() is not None:
            results.append(Result("server", "server_process_alive", "traceback",
                                  f"the server exited ({server.proc.returncode})"))
    log_text = server_log.read_text(errors="replace")
    if "Traceback" in log_text:
        log("server: its log holds a traceback (see the JSON)")
        results.append(Result("server", "server_log_has_no_traceback", "traceback",
                              "the server logged a traceback", {"log_tail": clip(log_text[-3000:], 2000)}))
    return results


# ====================================================================================== report

def summarize(results: list[Result], parts: list[str], seconds: dict[str, float]) -> dict:
    summary = {}
    for part in parts:
        rs = [r for r in results if r.part == part]
        counts = {o: sum(r.outcome == o for r in rs) for o in OUTCOMES}
        summary[part] = {"cases": len(rs), **counts, "valid_refused": sum(r.valid_refused for r in rs),
                         "seconds": round(seconds.get(part, 0.0), 1)}
    total = {k: sum(s[k] for s in summary.values()) for k in ("cases", *OUTCOMES, "valid_refused")}
    summary["total"] = {**total, "seconds": round(sum(seconds.values()), 1)}
    return summary


def table(summary: dict) -> str:
    head = ["part", "cases tried", HEADERS["ok"], HEADERS["traceback"], HEADERS["hang"], HEADERS["lost"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for part, s in summary.items():
        lines.append(f"| {part} | {s['cases']} | {s['ok'] + s['clear']} | {s['traceback']} | {s['hang']} | "
                     f"{s['lost']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=None,
                    help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all; with --quick: "
                         f"{','.join(QUICK_PARTS)})")
    ap.add_argument("--quick", action="store_true",
                    help="a reduced case list: each kind of data file once and a third of the rest (1 MB instead "
                         "of 20 MB values), the cheap flag cases and one of each kind of check; what "
                         "tests/unit/test_probe.py runs (< 60 s)")
    ap.add_argument("--out", default="bench/probe.json", help="where the JSON goes ('' for none; default: %(default)s)")
    ap.add_argument("--model", default=None,
                    help="HF model directory for the launchers and the server (default: the micro preset)")
    ap.add_argument("--jobs", type=int, default=2, help="launcher subprocesses run at once (default: %(default)s)")
    ap.add_argument("--load_timeout_s", type=float, default=30.0,
                    help="time bound of one data file's load, beyond which it is a hang (default: %(default)s)")
    ap.add_argument("--request_timeout_s", type=float, default=30.0,
                    help="time bound of one server request, beyond which it is a hang (default: %(default)s)")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: run only the cases whose name holds one of them "
                         "(e.g. 'lone_surrogate,serve.py:port'); the JSON then covers those alone")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory of files and logs")
    ap.add_argument("--show_all", action="store_true", help="print every case, not only the failing ones")
    args = ap.parse_args(argv)
    parts = (args.parts or ",".join(QUICK_PARTS if args.quick else PARTS)).split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown part(s) {', '.join(unknown)}; expected some of {','.join(PARTS)}")
    if args.jobs < 1 or args.load_timeout_s <= 0 or args.request_timeout_s <= 0:
        ap.error("--jobs must be >= 1 and the timeouts > 0")

    only = [o for o in (args.only or "").split(",") if o]

    def keep(name: str) -> bool:
        return not only or any(o in name for o in only)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="coati_probe_"))
    results: list[Result] = []
    seconds: dict[str, float] = {}
    model = args.model
    if model is None and any(p != "loaders" for p in parts):
        from coati_ray.defaults import default_model_dir

        model = str(default_model_dir("llama", "micro"))
    try:
        for part in parts:
            t0 = time.monotonic()
            log(f"{part}: running")
            if part == "loaders":
                results += run_loaders(tmp, args.quick, args.load_timeout_s, log, keep)
            elif part == "launchers":
                cases = [c for c in launcher_cases(model, args.quick) if keep(c.name)]
                prepare_proc_case_files(cases, tmp)
                results += run_proc_cases(cases, tmp, args.jobs, log)
            elif part == "flags":
                with socket.socket() as busy:  # a port something already listens on
                    busy.bind(("127.0.0.1", 0))
                    busy.listen(1)
                    cases = [c for c in flag_cases(model, args.quick, busy.getsockname()[1]) if keep(c.name)]
                    prepare_proc_case_files(cases, tmp)
                    results += run_proc_cases(cases, tmp, args.jobs, log)
            elif part == "server":
                results += run_server(tmp, model, args.request_timeout_s, log, keep)
            seconds[part] = time.monotonic() - t0
            log(f"{part}: {sum(r.part == part for r in results)} cases in {seconds[part]:.1f} s")
    finally:
        if args.keep:
            log(f"files and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(results, parts, seconds)
    failing = [r for r in results if r.outcome in ("traceback", "hang", "lost")]
    refused = [r for r in results if r.valid_refused]
    for r in results if args.show_all else failing:
        print(f"[{r.outcome}] {r.part}: {r.name}: {r.detail}")
        for k, v in r.repro.items():
            print(f"    {k}: {v}")
    for r in refused:
        print(f"[valid input refused] {r.part}: {r.name}: {r.detail}")
    print(table(summary))
    print(f"{summary['total']['cases']} cases in {time.monotonic() - t_all:.0f} s; "
          f"{len(failing)} not ok or clear; {len(refused)} valid inputs refused with a clear error")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python scripts/probe.py " + " ".join(sys.argv[1:] if argv is None else argv)
        doc = {"date": time.strftime("%Y-%m-%d"), "command": command.strip(),
               "python": platform.python_version(), "cpu_count": os.cpu_count(), "quick": args.quick, "parts": parts,
               "seconds": round(time.monotonic() - t_all, 1), "summary": summary,
               "failures": [r.__dict__ for r in failing], "valid_refused": [r.__dict__ for r in refused],
               # each case of the small parts; the loaders' 1500 are in the summary and failures
               "cases": {f"{r.part}: {r.name}": [r.outcome, round(r.seconds, 1)] for r in results
                         if r.part != "loaders"}}
        out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
