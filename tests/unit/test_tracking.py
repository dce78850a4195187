"""--report_to: what each tracker holds after a run's calls, read back with the tracker's own reader
(TensorBoard's EventAccumulator, wandb's offline run file, MLflow's client over its SQLite store)."""

from __future__ import annotations

import json
import struct

import pytest

from coati_ray.errors import ConfigError
from coati_ray.tracking import Trackers, flat_hparams, parse_report_to

CONFIG = {"run": {"lr": 1e-5, "seed": 7, "resume": "no", "max_steps": None}, "rollout": {"temperature": 0.9}}
STEPS = [(1, 0.25, 0.01), (2, 0.5, 0.02), (3, 0.75, 0.04)]  # step, reward/mean, kl/mean
SAMPLES = [{"prompt": "1 + 1 =", "response": "2 | two", "reward": 0.5},
           {"prompt": "你好", "response": "你好！", "reward": -1.0}]


def test_report_to_parses_lists_and_refuses_unknown_names():
    assert parse_report_to("tensorboard") == ["tensorboard"]
    assert parse_report_to(" TensorBoard, wandb ,tensorboard") == ["tensorboard", "wandb"]
    assert parse_report_to("none") == []
    with pytest.raises(ConfigError, match=r"--report_to: unknown tracker 'comet'; expected a comma-separated list of "
                                          r"tensorboard, wandb, mlflow, or none"):
        parse_report_to("tensorboard,comet")
    with pytest.raises(ConfigError, match="unknown tracker"):
        parse_report_to(",")


def test_hparams_are_flattened_and_kept_as_trackers_can_hold_them():
    assert flat_hparams(CONFIG) == {"run.lr": 1e-5, "run.seed": 7, "run.resume": "no", "run.max_steps": "null",
                                    "rollout.temperature": 0.9}
    assert flat_hparams({"a": {"b": [1, 2]}}) == {"a.b": "[1, 2]"}


def _log(save, names, run_id="abc123def456"):
    t = Trackers(names, str(save), "ppo", run_id, CONFIG)
    for step, r, kl in STEPS:
        t.scalars({"reward/mean": r, "kl/mean": kl}, step)
    t.samples(SAMPLES, 3)
    t.close()
    return t


def test_tensorboard_holds_scalars_hparams_and_the_sample_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["kl/mean", "reward/mean"]
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert acc.Scalars("kl/mean")[2].value == pytest.approx(0.04)
    text = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
            for tag in ("samples", "config")}
    step, table = text["samples"][0]
    assert step == 3
    assert table.splitlines()[0] == "| step | prompt | response | reward |"
    assert "| 3 | 1 + 1 = | 2 \\| two | 0.5000 |" in table  # a | in a response does not break the table
    assert "| 3 | 你好 | 你好！ | -1.0000 |" in table
    assert json.loads(text["config"][0][1].strip("`\n")) == CONFIG
    assert "_hparams_/session_start_info" in acc.summary_metadata  # TensorBoard's HParams tab reads this


def _wandb_records(save):
    """The records of wandb's offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list((save / "wandb").glob("offline-run-*/run-*.wandb"))
    data, pos, block, records, part = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return path.parent, records


def test_wandb_offline_run_holds_config_history_and_the_sample_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "coati_test")
    t = _log(tmp_path, ["wandb"])
    assert t.where() == ["wandb (offline run abc123def456, project coati_test)"]
    run_dir, records = _wandb_records(tmp_path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_id, run.project, run.display_name) == ("abc123def456", "coati_test", f"ppo-{tmp_path.name}")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["run.lr"] == 1e-5 and config["rollout.temperature"] == 0.9
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["reward/mean"], h["kl/mean"]) for h in history if "reward/mean" in h] == STEPS
    table_row = next(h for h in history if "samples/path" in h)
    assert table_row["_step"] == 3 and table_row["samples/nrows"] == 2
    table = json.loads((run_dir / "files" / table_row["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "response", "reward"]
    assert table["data"] == [[3, "1 + 1 =", "2 | two", 0.5], [3, "你好", "你好！", -1.0]]


def test_mlflow_local_store_holds_params_metrics_and_samples_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = _log(tmp_path, ["mlflow"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(t.mlflow_run_id)
    assert run.data.tags["coati.run_id"] == "abc123def456" and run.info.status == "FINISHED"
    assert run.data.params["run.lr"] == "1e-05" and run.data.params["run.max_steps"] == "null"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward/mean")] == \
        [(s, r) for s, r, _ in STEPS]
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    table = json.loads((tmp_path / "mlartifacts").joinpath(*run.info.artifact_uri.split("mlartifacts/")[1].split("/"),
                                                            "samples", "step_000003.json").read_text())
    assert table["columns"] == ["step", "prompt", "response", "reward"]
    assert table["data"] == [[3, "1 + 1 =", "2 | two", 0.5], [3, "你好", "你好！", -1.0]]
    # a resumed run (same run.json id) logs on into the same MLflow run
    again = Trackers(["mlflow"], str(tmp_path), "ppo", "abc123def456", CONFIG)
    again.scalars({"reward/mean": 0.9}, 4)
    again.close()
    assert again.mlflow_run_id == t.mlflow_run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [1, 2, 3, 4]
