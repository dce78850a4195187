"""Datasets by name (coati_ray/data/hub.py): a local dataset repository laid out as the Hub serves one (a README
card whose YAML `configs:` list data_files, Parquet shards under data/), read through `datasets.load_dataset` and
validated exactly as files are; and a Hub id with the Hub out of reach, which must give one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coati_ray.config import PromptDataArgs, SFTDataArgs
from coati_ray.data.hub import check_source, resolve
from coati_ray.data.loading import load_rows, prompt_columns, sft_schema
from coati_ray.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]

# Values a converter could change: CRLF and U+2028 inside text, outer spaces, digits that look like a number
INSTRUCT = {
    "train": [[{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
               {"instruction": "  Keep my spaces  ", "input": "a\r\nb", "output": "1e3"}],
              [{"instruction": "Translate: 小明有3个苹果", "input": "", "output": "Xiao Ming has 3 apples.\u2028"}]],
    "test": [[{"instruction": "Say hi.", "input": "", "output": "hi"}]],
}
CHAT = {
    "train": [[{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}],
              [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}]}]],
    "test": [[{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}]],
}
CARD = """---
configs:
- config_name: instruct
  data_files:
  - split: train
    path: data/instruct/train-*.parquet
  - split: test
    path: data/instruct/test-*.parquet
- config_name: chat
  data_files:
  - split: train
    path: data/chat/train-*.parquet
  - split: test
    path: data/chat/test-*.parquet
---
# A tiny instruction dataset, laid out as the Hub serves one
"""


def write_shards(folder: Path, splits: dict[str, list[list[dict]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, shards in splits.items():
        for i, rows in enumerate(shards):
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-{i:05d}-of-{len(shards):05d}.parquet")


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """datasets writes each loaded repository's Arrow cache here, not under the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "tiny-instruct"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(CARD, encoding="utf-8")
    write_shards(root / "data" / "instruct", INSTRUCT)
    write_shards(root / "data" / "chat", CHAT)
    return root


def flat(shards: list[list[dict]]) -> list[dict]:
    return [r for shard in shards for r in shard]


@pytest.mark.parametrize("config,split", [("instruct", "train"), ("instruct", "test"), ("chat", "train"),
                                          ("chat", "test")])
def test_each_config_and_split_of_a_local_repository_loads_exactly(repo, config, split):
    loaded = load_rows(repo, sft_schema({}), split=split, config=config)
    want = flat((INSTRUCT if config == "instruct" else CHAT)[split])
    assert list(loaded.dataset) == want  # every shard, in order, values unchanged
    assert loaded.skipped == []


def test_a_slice_of_a_split_reads_the_first_rows(repo):
    loaded = load_rows(repo, sft_schema({}), split="train[:2]", config="instruct")
    assert list(loaded.dataset) == flat(INSTRUCT["train"])[:2]


def test_resolve_keeps_files_and_saved_datasets_on_their_own_readers(repo, tmp_path):
    shard = next((repo / "data" / "instruct").glob("train-00000-*.parquet"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(flat(INSTRUCT["test"])).save_to_disk(str(saved))
    assert resolve(shard) is None and resolve(saved) is None
    assert resolve(tmp_path / "missing.jsonl") is None  # a missing file is "no such file", not a Hub id
    assert resolve("data/train.jsonl") is None
    assert resolve(repo, "test", "chat").local
    ref = resolve("HuggingFaceH4/ultrachat_200k", "train_sft")
    assert (ref.name, ref.split, ref.local) == ("HuggingFaceH4/ultrachat_200k", "train_sft", False)
    assert list(load_rows(saved, sft_schema({})).dataset) == flat(INSTRUCT["test"])


def test_unknown_split_names_the_splits_there_are(repo):
    data = SFTDataArgs(dataset=str(repo), dataset_config="chat", dataset_split="validation")
    with pytest.raises(DataError) as e:
        check_source(data.dataset, "dataset", data)
    assert str(e.value) == (f"--dataset {repo}: no split 'validation' of config chat; its splits: train, test; "
                            "pick one with --dataset_split")


def test_unknown_or_missing_config_names_the_configs_there_are(repo):
    data = SFTDataArgs(dataset=str(repo), eval_dataset=str(repo), eval_dataset_config="chats")
    with pytest.raises(DataError, match=r"^--eval_dataset .*: no config 'chats'; its configs: instruct, chat; "
                                        r"pick one with --eval_dataset_config$"):
        check_source(data.eval_dataset, "eval_dataset", data)
    with pytest.raises(DataError, match=r": has 2 configs and none is the default: instruct, chat; pick one with "
                                        r"--dataset_config$"):
        check_source(data.dataset, "dataset", data)


def test_a_bad_row_names_dataset_config_split_row_and_field_or_is_counted(repo):
    for old in repo.glob("data/chat/test-*.parquet"):
        old.unlink()
    write_shards(repo / "data" / "chat", {"test": [[{"messages": [{"role": "user", "content": "ok?"},
                                                                  {"role": "assistant", "content": "ok"}]}],
                                                   [{"messages": [{"role": "user", "content": "no answer"}]}]]})
    with pytest.raises(DataError) as e:
        load_rows(repo, sft_schema({}), split="test", config="chat")
    assert str(e.value) == (f"{repo} (config chat, split test), row 1, field 'messages': no assistant turn: "
                            "nothing to train on")
    loaded = load_rows(repo, sft_schema({}), skip_bad_rows=True, split="test", config="chat")
    assert loaded.skipped == [str(e.value)] and len(loaded) == 1


def test_numbers_where_text_belongs_are_refused_not_converted(repo, tmp_path, monkeypatch):
    """Shards that all hold an int column: the row error, as for a file. A shard whose column type differs from
    the first shard's (datasets would cast its 42 to "42"): an error naming the shard."""
    for old in repo.glob("data/instruct/*.parquet"):
        old.unlink()
    write_shards(repo / "data" / "instruct", {"train": [[{"instruction": "P", "input": "", "output": 41}]],
                                              "test": [[{"instruction": "Q", "input": "", "output": 42}]]})
    with pytest.raises(DataError, match=r"\(config instruct, split test\), row 0, field 'output': expected text, "
                                        r"got int 42$"):
        load_rows(repo, sft_schema({}), split="test", config="instruct")
    write_shards(repo / "data" / "instruct", {"train": [[{"instruction": "P", "input": "", "output": "41"}]]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache2"))  # the same names, new data
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet: column 'output' is Value\('int64'\), the "
                                        r"dataset's \(its first shard's\) Value\('string'\); datasets would convert"):
        load_rows(repo, sft_schema({}), split="test", config="instruct")


def test_prompt_and_pretrain_flags_have_their_own_split_and_config(repo, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    write_shards(prompts / "data", {"train": [[{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]],
                                    "validation": [[{"prompt": "1+1?", "answer": "2"}]]})
    data = PromptDataArgs(prompt_dataset_split="validation")
    check_source(str(prompts), "prompt_dataset", data)
    loaded = load_rows(prompts, prompt_columns(data.keys()), **data.hub_options("prompt_dataset"))
    assert loaded.dataset["prompt"] == ["1+1?"] and loaded.extra == [{"answer": "2"}]  # columns a reward reads
    with pytest.raises(DataError, match=r"^--pretrain_dataset .*: no split 'train'; its splits: train_sft; pick one "
                                        r"with --pretrain_dataset_split$"):
        write_shards(tmp_path / "text" / "data", {"train_sft": [[{"text": "t"}]]})
        check_source(str(tmp_path / "text"), "pretrain_dataset", data)


def test_split_or_config_flags_with_a_file_are_refused_not_ignored(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    check_source(str(f), "dataset", SFTDataArgs(dataset=str(f)))
    with pytest.raises(ConfigError, match=r"^--dataset_split: applies to a Hub dataset id or a dataset repository"):
        check_source(str(f), "dataset", SFTDataArgs(dataset=str(f), dataset_split="test"))
    with pytest.raises(ConfigError, match=r"^--eval_dataset_config: "):
        check_source(str(f), "eval_dataset", SFTDataArgs(eval_dataset=str(f), eval_dataset_config="x"))
    with pytest.raises(ConfigError, match=r"^--eval_dataset_split: given without --eval_dataset$"):
        check_source(None, "eval_dataset", SFTDataArgs(dataset=str(f), eval_dataset_split="test_sft"))
    check_source(None, "eval_dataset", SFTDataArgs(dataset=str(f)))  # no --eval_dataset: --eval_split of --dataset
    with pytest.raises(ConfigError, match="dataset_split: must name a split"):
        SFTDataArgs(dataset_split=" ").validate()


def test_a_directory_that_is_no_dataset_says_what_a_dataset_directory_is(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.md").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="neither saved with save_to_disk nor a dataset repository"):
        load_rows(tmp_path / "notes", sft_schema({}))


def test_hub_id_with_the_hub_out_of_reach_is_one_clear_line(tmp_path, micro_model):
    """What a user without network sees: the launcher's one line and exit status 2, no traceback, before any
    actor starts. HF_HUB_OFFLINE and an empty HF cache make it the same on any machine."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home"), RAY_AUTH_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    env.pop("HF_DATASETS_CACHE", None)
    p = subprocess.run([sys.executable, str(ROOT / "launchers" / "train_sft.py"), "--pretrain", micro_model,
                        "--dataset", "some-org/some-dataset", "--dataset_split", "train_sft",
                        "--save_path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, p.stderr[-2000:]
    assert errors[0].endswith(
        "error: --dataset some-org/some-dataset: no such local path, and cannot reach the Hugging Face Hub "
        "(OfflineModeIsEnabled, HF_HUB_OFFLINE is set) to fetch it as a dataset id; download it first (`hf download "
        "--repo-type dataset some-org/some-dataset --local-dir some-dataset`) and pass --dataset some-dataset")
    assert not (tmp_path / "out").exists()  # stopped before the run claimed its directory


def test_sft_trains_from_a_local_repository_with_its_test_split_as_eval(repo, tmp_path):
    from helpers import train

    data = SFTDataArgs(dataset=str(repo), dataset_config="instruct", eval_dataset=str(repo),
                       eval_dataset_config="instruct", eval_dataset_split="test")
    result = train(tmp_path, "sft", local=True, data=data, batch_size=1, max_steps=2)
    assert (result.setup.n_train, result.setup.n_eval) == (3, 1)
    assert len(result.history) == 2 and result.final_eval
    assert (tmp_path / "sft" / "model.safetensors").exists()
    saved = (tmp_path / "sft" / "config.yaml").read_text(encoding="utf-8")
    assert "dataset_config: instruct" in saved and "eval_dataset_split: test" in saved  # what --resume compares
