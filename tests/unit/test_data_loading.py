import json

import datasets
import pytest

from coati_ray.data import formatting as fmt
from coati_ray.data.loading import load_rows, pair_columns, prompt_columns, sft_columns
from coati_ray.errors import DataError

ROWS = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Solve.", "input": "小明有3个苹果", "output": "答案是3。"}]
SFT = sft_columns({})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt_name", ["json", "jsonl", "csv", "parquet", "saved_dir", "saved_dict"])
def test_every_supported_format_loads_the_same_rows(tmp_path, fmt_name):
    ds = datasets.Dataset.from_list(ROWS)
    path = {"json": tmp_path / "d.json", "jsonl": tmp_path / "d.jsonl", "csv": tmp_path / "d.csv",
            "parquet": tmp_path / "d.parquet", "saved_dir": tmp_path / "dir", "saved_dict": tmp_path / "dd"}[fmt_name]
    if fmt_name == "json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    elif fmt_name == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt_name == "csv":
        ds.to_csv(str(path), index=False)
    elif fmt_name == "parquet":
        ds.to_parquet(str(path))
    elif fmt_name == "saved_dir":
        ds.save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    loaded = load_rows(path, SFT)
    assert isinstance(loaded.dataset, datasets.Dataset)
    assert list(loaded.dataset) == ROWS


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "hi", "good": "a", "bad": "b"}])
    rows = list(load_rows(path, pair_columns({"prompt": "q", "chosen": "good", "rejected": "bad"})).dataset)
    assert rows == [{"prompt": "hi", "chosen": "a", "rejected": "b"}]


def test_each_stage_data_args_map_only_their_own_columns(tmp_path):
    from coati_ray.config import PairDataArgs, PromptDataArgs, SFTDataArgs

    assert SFTDataArgs(instruction_key="q").keys() == {"instruction": "q", "input": "input", "output": "output",
                                                       "messages": "messages"}
    assert PairDataArgs(chosen_key="good").keys() == {"prompt": "prompt", "chosen": "good", "rejected": "rejected"}
    assert PromptDataArgs().keys() == {"prompt": "prompt"}  # PPO builds it with no arguments
    assert (PromptDataArgs().max_len, PromptDataArgs().skip_bad_rows) == (512, False)
    assert not hasattr(PromptDataArgs(), "dataset") and not hasattr(SFTDataArgs(), "chosen_key")
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "hi", "good": "a", "bad": "b"}])
    keys = PairDataArgs(prompt_key="q", chosen_key="good", rejected_key="bad").keys()
    assert list(load_rows(path, pair_columns(keys)).dataset) == [{"prompt": "hi", "chosen": "a", "rejected": "b"}]


@pytest.mark.parametrize("cls,kw,field", [("PromptDataArgs", {"max_len": 4}, "max_len"),
                                          ("SFTDataArgs", {"eval_split": 1.0}, "eval_split"),
                                          ("PairDataArgs", {"max_samples": 0}, "max_samples")])
def test_data_args_validate(cls, kw, field):
    from coati_ray import config
    from coati_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--{field}: must be"):
        getattr(config, cls)(**kw).validate()
    getattr(config, cls)().validate()


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",,}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_rows(path, prompt_columns({}))
    assert str(path) in str(e.value) and "line 3" in str(e.value) and "invalid JSON" in str(e.value)


def test_missing_column_names_row_field_and_the_mapping_flag(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"},
                                              {"prompt": "b", "chosen": "x"}])
    with pytest.raises(DataError) as e:
        load_rows(path, pair_columns({}))
    msg = str(e.value)
    assert "line 2" in msg and "row 1" in msg and "field 'rejected'" in msg and "--rejected_key" in msg


def test_wrong_type_and_empty_value_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"row 0, field 'output': expected text, got list"):
        load_rows(write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": ["x"]}]), SFT)
    with pytest.raises(DataError, match=r"field 'output': expected non-empty text"):
        load_rows(write_jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": "  "}]), SFT)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_rows(tmp_path / "empty.jsonl", SFT)
    (tmp_path / "header_only.csv").write_text("prompt\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_rows(tmp_path / "header_only.csv", prompt_columns({}))
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.json", SFT)
    (tmp_path / "x.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(tmp_path / "x.txt", SFT)


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt\n"fine"\n"a","extra"\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_rows(path, prompt_columns({}))
    assert "line 3" in str(e.value) and "expected 1 fields" in str(e.value)


def test_skip_bad_rows_skips_and_counts(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text('{"prompt": "a"}\nnot json\n{"other": 1}\n{"prompt": "d"}\n', encoding="utf-8")
    loaded = load_rows(path, prompt_columns({}), skip_bad_rows=True)
    assert [r["prompt"] for r in loaded.dataset] == ["a", "d"]
    assert len(loaded.skipped) == 2 and "line 2" in loaded.skipped[0] and "line 3" in loaded.skipped[1]
    path.write_text("nope\nstill nope\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(path, prompt_columns({}), skip_bad_rows=True)


def test_sft_loss_mask_covers_exactly_the_response(tokenizer):
    item = fmt.tokenize_sft(tokenizer, "What is 2 + 3?", "2 + 3 = 5. The answer is 5.", max_len=512)
    labelled = [t for t, l in zip(item.input_ids, item.labels) if l != fmt.IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "2 + 3 = 5. The answer is 5." + tokenizer.eos_token
    n_prompt = sum(l == fmt.IGNORE_INDEX for l in item.labels)
    assert tokenizer.decode(item.input_ids[:n_prompt]) == fmt.render_prompt(tokenizer, "What is 2 + 3?")


def test_max_len_truncates_and_drops_samples_without_response(tokenizer):
    full = fmt.tokenize_sft(tokenizer, "What is 2 + 3?", "The answer is 5.", max_len=512)
    n_prompt = sum(l == fmt.IGNORE_INDEX for l in full.labels)
    cut = fmt.tokenize_sft(tokenizer, "What is 2 + 3?", "The answer is 5.", max_len=n_prompt + 2)
    assert len(cut.input_ids) == n_prompt + 2 and cut.labels[-2:] == full.labels[n_prompt:n_prompt + 2]
    assert fmt.tokenize_sft(tokenizer, "What is 2 + 3?", "The answer is 5.", max_len=n_prompt) is None


def test_fallback_prompt_for_tokenizer_without_chat_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    head, full = fmt.render_chat(plain, "Say hi", "hi")
    assert "### Instruction:\nSay hi" in head and full == head + "hi" + plain.eos_token
