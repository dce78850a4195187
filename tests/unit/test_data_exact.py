"""Issue 15: a row is loaded exactly, or it is a DataError naming file/line/field (a counted skip with
skip_bad_rows); never silently altered. Every test writes real small files in tmp_path."""

import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coati_ray.data.loading import load_rows, pair_columns, prompt_columns, sft_columns
from coati_ray.errors import DataError

SFT = sft_columns({})
PROMPT = prompt_columns({})
ODD = "a\u2028b\u2029c\u0085d"  # line separators that are legal inside a JSON string
ROWS = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Solve.", "input": "小明有3个苹果", "output": "答案是3。"}]


def dumps(row):
    return json.dumps(row, ensure_ascii=False)


@pytest.mark.parametrize("skip", [False, True])
def test_jsonl_text_with_unicode_line_separators_loads_exactly(tmp_path, skip):
    path = tmp_path / "u.jsonl"
    assert len(dumps({"prompt": ODD}).splitlines()) == 4  # what the old reader split the row into
    path.write_text(dumps({"prompt": ODD}) + "\n" + dumps({"prompt": "x"}) + "\n", encoding="utf-8")
    loaded = load_rows(path, PROMPT, skip_bad_rows=skip)
    assert [r["prompt"] for r in loaded.dataset] == [ODD, "x"] and loaded.skipped == []


def test_jsonl_line_numbers_after_unicode_separators_and_crlf(tmp_path):
    path = tmp_path / "u.jsonl"
    lines = [dumps({"prompt": ODD}), dumps({"prompt": "x\u2028"}), "", "not json", dumps({"prompt": "y"})]
    path.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    loaded = load_rows(path, PROMPT, skip_bad_rows=True)
    assert [r["prompt"] for r in loaded.dataset] == [ODD, "x\u2028", "y"]  # no "\r" left on any value
    assert len(loaded.skipped) == 1 and f"{path}, line 4, row 2: invalid JSON" in loaded.skipped[0]
    with pytest.raises(DataError, match=r"line 4, row 2: invalid JSON"):
        load_rows(path, PROMPT)


MULTI = "line one\nline two\r\nline three \u2028 four"
KINDS = {"sft": (SFT, {"instruction": "Do.\nThen stop.", "input": "in\nput", "output": MULTI}),
         "pairs": (pair_columns({}), {"prompt": "Q\nQ", "chosen": MULTI, "rejected": "no\n\nno"}),
         "prompts": (PROMPT, {"prompt": MULTI})}


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_csv_quoted_newlines_survive_exactly(tmp_path, kind, suffix):
    columns, row = KINDS[kind]
    path = tmp_path / f"d{suffix}"
    with open(path, "w", encoding="utf-8", newline="") as f:  # the csv module's own quoting
        w = csv.DictWriter(f, fieldnames=list(row), delimiter="\t" if suffix == ".tsv" else ",")
        w.writeheader()
        w.writerow(row)
        w.writerow({k: "plain" for k in row})
    loaded = load_rows(path, columns)
    assert list(loaded.dataset) == [row, {k: "plain" for k in row}]


def test_csv_written_by_datasets_keeps_multiline_values_and_first_line_numbers(tmp_path):
    rows = [{"prompt": "line one\nline two"}, {"prompt": "x"}]
    path = tmp_path / "p.csv"
    datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    assert list(load_rows(path, PROMPT).dataset) == rows
    path.write_text('prompt\n"a\nb\nc"\n"d","extra"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 5, row 1: expected 1 fields"):  # the bad row starts on line 5
        load_rows(path, PROMPT)


BOM = b"\xef\xbb\xbf"


def write_format(path, rows):
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_utf8_bom_is_accepted(tmp_path, suffix, skip):
    plain, with_bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    write_format(plain, ROWS)
    with_bom.write_bytes(BOM + plain.read_bytes())
    assert list(load_rows(plain, SFT).dataset) == ROWS
    loaded = load_rows(with_bom, SFT, skip_bad_rows=skip)
    assert list(loaded.dataset) == ROWS and loaded.skipped == []


def test_bom_does_not_shift_the_reported_byte_of_bad_utf8(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(BOM + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 15\)"):
        load_rows(path, PROMPT)


def test_int_parquet_column_is_refused_or_skipped_not_stringified(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": pa.array([42, 7], pa.int64())}), str(path))
    with pytest.raises(DataError) as e:
        load_rows(path, SFT)
    assert str(e.value) == f"{path}, row 0, field 'output': expected text, got int 42"
    mixed = tmp_path / "m.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["ok", None]}), str(mixed))
    with pytest.raises(DataError, match="expected non-empty text"):  # a null is missing, not "None"
        load_rows(mixed, SFT)
    loaded = load_rows(mixed, SFT, skip_bad_rows=True)
    assert list(loaded.dataset) == [{"instruction": "a", "input": "", "output": "ok"}] and len(loaded.skipped) == 1
    with pytest.raises(DataError, match="no usable rows: all 2 rows were bad; first: .*got int 42"):
        load_rows(path, SFT, skip_bad_rows=True)


@pytest.mark.parametrize("value,shown", [(42, "int 42"), (4.5, "float 4.5"), (True, "bool True")])
def test_jsonl_number_where_text_is_expected(tmp_path, value, shown):
    path = tmp_path / "n.jsonl"
    path.write_text(dumps({"instruction": "a", "output": "fine"}) + "\n"
                    + dumps({"instruction": "b", "output": value}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_rows(path, SFT)
    assert str(e.value) == f"{path}, line 2, row 1, field 'output': expected text, got {shown}"
    loaded = load_rows(path, SFT, skip_bad_rows=True)
    assert list(loaded.dataset) == [{"instruction": "a", "input": "", "output": "fine"}]
    assert loaded.skipped == [str(e.value)]


def test_number_that_was_text_in_the_file_stays_text(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(dumps({"instruction": "a", "output": "042"}) + "\n", encoding="utf-8")
    assert load_rows(path, SFT).dataset[0]["output"] == "042"
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("instruction,output\na,1e3\n", encoding="utf-8")
    assert load_rows(csv_path, SFT).dataset[0]["output"] == "1e3"


DEEP = "[" * 100000


def test_deeply_nested_jsonl_line_is_a_data_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(dumps({"prompt": "a"}) + "\n" + DEEP + "\n" + '{"prompt": ' + DEEP + "\n"
                    + dumps({"prompt": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_rows(path, PROMPT)
    assert str(e.value) == f"{path}, line 2, row 1: invalid JSON: nested too deeply to parse"
    loaded = load_rows(path, PROMPT, skip_bad_rows=True)
    assert [r["prompt"] for r in loaded.dataset] == ["a", "b"]
    assert len(loaded.skipped) == 2 and "line 2" in loaded.skipped[0] and "line 3" in loaded.skipped[1]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("body", [DEEP, '{"a": ' * 100000])
def test_deeply_nested_json_file_is_a_data_error(tmp_path, body, skip):
    path = tmp_path / "d.json"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_rows(path, PROMPT, skip_bad_rows=skip)
    assert str(e.value).startswith(f"{path}") and "invalid JSON" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("skip", [False, True])
def test_zero_row_parquet_says_no_rows_like_other_formats(tmp_path, skip):
    path = tmp_path / "z.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), str(path))
    header_only = tmp_path / "h.csv"
    header_only.write_text("prompt\n", encoding="utf-8")
    with pytest.raises(DataError) as csv_err:
        load_rows(header_only, PROMPT, skip_bad_rows=skip)
    with pytest.raises(DataError) as e:
        load_rows(path, PROMPT, skip_bad_rows=skip)
    assert str(e.value) == f"{path}: the dataset is empty (no rows)"
    assert str(csv_err.value) == f"{header_only}: the dataset is empty (no rows)"


def test_corrupt_parquet_is_still_reported_as_unreadable(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_rows(path, PROMPT)
