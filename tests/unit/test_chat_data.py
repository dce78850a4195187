"""Conversational rows in every stage's loader: formats detected per row, read exactly, bad turns named."""

import json

import pytest

from coati_ray.data.loading import load_rows, pair_schema, prompt_columns, sft_schema, unpaired_columns
from coati_ray.errors import DataError

U = {"role": "user", "content": "Tom has 3 apples. How many?"}
A = {"role": "assistant", "content": "3."}
S = {"role": "system", "content": "Be brief."}


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_reads_messages_sharegpt_colossalchat_and_instruction_rows_in_one_file(tmp_path):
    path = jsonl(tmp_path, [
        {"messages": [S, U, A]},
        {"conversations": [{"from": "human", "value": U["content"]}, {"from": "gpt", "value": "3."}]},
        {"messages": [{"from": "user", "content": U["content"]}, {"from": "assistant", "content": "3."}]},
        {"instruction": "Add.", "input": "1 + 1", "output": "2"},
    ])
    rows = list(load_rows(path, sft_schema({})).dataset)
    assert [r["messages"] for r in rows[:3]] == [[S, U, A], [U, A], [U, A]]
    assert rows[3] == {"messages": [], "instruction": "Add.", "input": "1 + 1", "output": "2"}
    assert rows[0]["instruction"] == "" and rows[0]["output"] == ""


def test_sft_messages_key_maps_another_column(tmp_path):
    path = jsonl(tmp_path, [{"dialog": [U, A]}])
    assert list(load_rows(path, sft_schema({"messages": "dialog"})).dataset)[0]["messages"] == [U, A]


@pytest.mark.parametrize("messages,where,message", [
    ([U, {"role": "bot", "content": "x"}], "line 2, row 1, field 'messages[1]'", "unknown role 'bot'"),
    ([U, A, A], "line 2, row 1, field 'messages[2]'", "expected a user turn"),
    ([], "line 2, row 1, field 'messages'", "the conversation is empty"),
    ([S, U], "line 2, row 1, field 'messages'", "no assistant turn"),
    ([U, {"role": "assistant", "content": ["3"]}], "line 2, row 1, field 'messages[1]'",
     "content must be text, got list"),
    ("hello", "line 2, row 1, field 'messages'", "expected a list of messages, got str"),
])
def test_a_bad_conversation_is_one_line_naming_file_line_row_and_turn(tmp_path, messages, where, message):
    path = jsonl(tmp_path, [{"messages": [U, A]}, {"messages": messages}])
    with pytest.raises(DataError) as e:
        load_rows(path, sft_schema({}))
    assert str(e.value).startswith(f"{path}, {where}: {message}")
    loaded = load_rows(path, sft_schema({}), skip_bad_rows=True)  # or skipped and counted
    assert len(loaded) == 1 and len(loaded.skipped) == 1


def test_pairs_with_message_prompts_one_message_answers_and_implicit_prompts(tmp_path):
    path = jsonl(tmp_path, [
        {"prompt": "plain?", "chosen": "a", "rejected": "b"},
        {"prompt": [S, U], "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
        {"chosen": [U, {"role": "assistant", "content": "a"}], "rejected": [U, {"role": "assistant", "content": "b"}]},
        {"context": [{"from": "user", "content": U["content"]}], "chosen": [{"from": "assistant", "content": "a"}],
         "rejected": [{"from": "assistant", "content": "b"}]},
    ])
    rows = list(load_rows(path, pair_schema({})).dataset)
    # one type per column: the text prompt becomes its one user turn (it renders to the same prompt)
    assert rows[0] == {"prompt": [{"role": "user", "content": "plain?"}], "chosen": "a", "rejected": "b"}
    assert rows[1] == {"prompt": [S, U], "chosen": "a", "rejected": "b"}
    assert rows[2] == {"prompt": [U], "chosen": "a", "rejected": "b"}
    assert rows[3] == {"prompt": [U], "chosen": "a", "rejected": "b"}


def test_text_only_pairs_keep_text_prompts(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert list(load_rows(path, pair_schema({})).dataset) == [{"prompt": "p", "chosen": "a", "rejected": "b"}]


@pytest.mark.parametrize("row,message", [
    ({"chosen": [U, A], "rejected": [S, U, A]}, "chosen and rejected must share every turn but their last"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": [U], "chosen": [A, A], "rejected": "b"}, "expected exactly one assistant message, got 2 turns"),
    ({"prompt": [U, A], "chosen": "a", "rejected": "b"}, "the last turn must be a user turn"),
])
def test_bad_pairs_are_named(tmp_path, row, message):
    path = jsonl(tmp_path, [row])
    with pytest.raises(DataError, match="row 0") as e:
        load_rows(path, pair_schema({}))
    assert message in str(e.value)


def test_kto_rows_read_booleans_exactly(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [U], "completion": "3.", "label": True},
                            {"prompt": "q", "completion": [{"role": "assistant", "content": "x"}], "label": False}])
    rows = list(load_rows(path, unpaired_columns({})).dataset)
    assert [(r["completion"], r["label"]) for r in rows] == [("3.", True), ("x", False)]
    colossal = jsonl(tmp_path, [{"prompt": [{"from": "user", "content": "q"}],  # ColossalChat's KTO rows
                                 "completion": {"from": "assistant", "content": "a"}, "label": True}], "c.jsonl")
    assert list(load_rows(colossal, unpaired_columns({})).dataset) == [
        {"prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": True}]
    csv = tmp_path / "k.csv"
    csv.write_text("prompt,completion,label\nq,a,true\nq,b,FALSE\n", encoding="utf-8")
    assert [r["label"] for r in load_rows(csv, unpaired_columns({})).dataset] == [True, False]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,completion,label\nq,a,yes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2, row 0, field 'label': expected a boolean \(true or false\), "
                                        r"got str 'yes'"):
        load_rows(bad, unpaired_columns({}))
    with pytest.raises(DataError, match="got int 1"):
        load_rows(jsonl(tmp_path, [{"prompt": "q", "completion": "a", "label": 1}], "i.jsonl"), unpaired_columns({}))


def test_ppo_prompts_as_messages_keep_their_other_columns(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [S, U], "answer": 3}, {"prompt": "text", "answer": 4}])
    loaded = load_rows(path, prompt_columns({}))
    assert loaded.dataset["prompt"] == [[S, U], [{"role": "user", "content": "text"}]]
    assert loaded.extra == [{"answer": 3}, {"answer": 4}]
    with pytest.raises(DataError, match=r"field 'prompt\[1\]': the last turn must be a user turn"):
        load_rows(jsonl(tmp_path, [{"prompt": [U, A]}], "p.jsonl"), prompt_columns({}))
