"""Conversations and preference optimization on a real local Ray: SFT on dialogues, RM / DPO on conversational
pairs, KTO on unpaired rows (2 trainers each), LoRA DPO, and resuming DPO."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from helpers import max_diff, weights

from coati_ray.config import (
    ClusterArgs,
    ModelArgs,
    PairDataArgs,
    PreferenceArgs,
    PreferenceDataArgs,
    RMArgs,
    SFTDataArgs,
    TrainArgs,
)
from coati_ray.data import demo
from coati_ray.pipelines.supervised import run_training


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(5)
    pairs = demo.chat_pair_rows(rng, 96)
    kto = []
    for r in demo.chat_pair_rows(rng, 48):
        if "prompt" in r:
            kto += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                    {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    return {"sft": write_jsonl(root / "sft.jsonl", demo.chat_sft_rows(rng, 96)),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs), "kto": write_jsonl(root / "kto.jsonl", kto)}


def ta(path, **kw) -> TrainArgs:
    base = dict(batch_size=4, max_steps=6, lr=1e-3, log_interval=1000, warmup_ratio=0.0, save_path=str(path))
    return TrainArgs(**{**base, **kw})


def dpo(path, dataset, trainers=2, pref=None, model=None, **kw):
    return run_training("dpo", model or ModelArgs(preset_size="micro"),
                        PreferenceDataArgs(dataset=dataset, eval_split=0.25), ta(path, **kw),
                        ClusterArgs(trainers=trainers), pref=pref or PreferenceArgs(), progress=False)


def test_sft_on_dialogues_with_two_trainers(ray_cluster, chat_files, tmp_path):
    r = run_training("sft", ModelArgs(preset_size="micro"), SFTDataArgs(dataset=chat_files["sft"], eval_split=0.1),
                     ta(tmp_path / "sft", max_steps=8, lr=3e-3), ClusterArgs(trainers=2), progress=False)
    assert r.setup.n_train + r.setup.n_eval == 96 and r.setup.dropped_samples == 0
    assert r.history[-1]["train/loss"] < 0.9 * r.history[0]["train/loss"]
    assert "eval/loss" in r.final_eval


def test_reward_model_on_conversational_pairs_with_two_trainers(ray_cluster, chat_files, tmp_path):
    r = run_training("rm", ModelArgs(preset_size="micro"), PairDataArgs(dataset=chat_files["pairs"], eval_split=0.25),
                     ta(tmp_path / "rm"), ClusterArgs(trainers=2), RMArgs(), progress=False)
    assert r.setup.n_train == 72 and 0.0 <= r.final_eval["eval/accuracy"] <= 1.0


@pytest.fixture(scope="module")
def dpo_two(ray_cluster, chat_files, tmp_path_factory):
    return dpo(tmp_path_factory.mktemp("dpo2") / "dpo", chat_files["pairs"], ckpt_interval=3)


def test_dpo_on_two_trainers_starts_at_ln2_and_learns_the_pairs(dpo_two):
    h = dpo_two.history
    # the reference is the starting model: at step 1 policy == reference, every h = 0, loss = log 2
    assert h[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert h[0]["train/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert h[-1]["train/rewards/margin"] > 0 and h[-1]["train/loss"] < math.log(2)
    assert dpo_two.setup.reference_seconds > 0
    ev = dpo_two.final_eval
    assert set(ev) >= {"eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margin",
                       "eval/rewards/accuracy"}
    assert ev["eval/rewards/margin"] == pytest.approx(ev["eval/rewards/chosen"] - ev["eval/rewards/rejected"])


def test_dpo_on_one_trainer_with_accumulation_is_the_same_update(dpo_two, chat_files, tmp_path):
    """The ranks split the reference pass and all-reduce it: it must equal one rank computing all of it."""
    one = dpo(tmp_path / "dpo1", chat_files["pairs"], trainers=1, accumulation_steps=2, batch_size=4)
    for x, y in zip(one.history, dpo_two.history, strict=True):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5, abs=1e-6)
    assert one.final_eval["eval/rewards/accuracy"] == pytest.approx(dpo_two.final_eval["eval/rewards/accuracy"])


def test_dpo_under_fsdp_is_the_same_update_as_under_ddp(dpo_two, chat_files, tmp_path):
    r = dpo(tmp_path / "fsdp", chat_files["pairs"], strategy="fsdp")
    for x, y in zip(r.history, dpo_two.history, strict=True):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5, abs=1e-6)


def test_dpo_resumes_with_the_reference_of_the_starting_model(dpo_two, chat_files, tmp_path):
    save = tmp_path / "resumed"
    shutil.copytree(dpo_two.save_path, save)
    shutil.rmtree(save / "checkpoints" / "step_6")  # continue from step 3
    r = dpo(save, chat_files["pairs"], resume="auto", ckpt_interval=3)
    assert r.start_step == 3
    for x, y in zip(r.history, dpo_two.history[3:], strict=True):  # a reference from trained weights would differ
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_the_other_pair_losses_train(ray_cluster, chat_files, tmp_path, loss):
    r = dpo(tmp_path / loss, chat_files["pairs"], trainers=1, pref=PreferenceArgs(loss=loss), max_steps=4)
    assert (r.setup.reference_seconds > 0) == (loss == "ipo")  # simpo and orpo need no reference
    assert all(math.isfinite(m["train/loss"]) for m in r.history)
    assert r.history[-1]["train/loss"] < r.history[0]["train/loss"]


def test_kto_on_unpaired_rows_with_two_trainers(ray_cluster, chat_files, tmp_path):
    pref = PreferenceArgs(loss="kto", desirable_weight=1.0, undesirable_weight=1.5)
    r = dpo(tmp_path / "kto", chat_files["kto"], pref=pref, max_steps=16, max_epochs=4)
    h = r.history
    assert len(h) == 16
    assert h[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # z0 = max(0, mean(pi - ref)) = 0 at the start
    assert h[0]["train/rewards/signed"] == pytest.approx(0.0, abs=1e-6)
    # desirable completions gain log-prob against the reference, undesirable ones lose it (last epoch)
    assert sum(m["train/rewards/signed"] for m in h[-4:]) > 0
    ev = r.final_eval
    assert {"eval/rewards/chosen", "eval/rewards/rejected", "eval/kl", "eval/rewards/accuracy"} <= set(ev)


def test_lora_dpo_trains_only_the_adapter_against_the_base(ray_cluster, chat_files, tmp_path):
    r = dpo(tmp_path / "lora", chat_files["pairs"], model=ModelArgs(preset_size="micro", lora_rank=4), max_steps=4)
    assert r.setup.trainable_params < 0.2 * r.setup.params
    # LoRA's B starts at zero, and the reference is the base with the adapter disabled: equal at step 1
    assert r.history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert r.history[-1]["train/loss"] < math.log(2)
    saved = Path(r.save_path)
    assert (saved / "adapter_config.json").exists() and not (saved / "model.safetensors").exists()


def test_dpo_moves_the_weights(dpo_two):
    from coati_ray.models.loading import resolve_model_path

    assert max_diff(weights(dpo_two.save_path), weights(resolve_model_path(None, "auto", "micro"))) > 1e-4


def test_the_demo_runs_its_dpo_recipe(ray_cluster, tmp_path):
    from coati_ray.pipelines.demo import DemoArgs, run_demo

    s = run_demo(DemoArgs(recipe="dpo", preset_size="micro", sft_epochs=1, batch_size=64, dpo_epochs=1,
                          eval_prompts=8, out=str(tmp_path / "demo")))
    assert s["recipe"] == "dpo" and s["rm"] is None and "ppo" not in s
    assert s["dpo"]["steps"] == 3300 // 64 and s["dpo"]["reference_seconds"] > 0
    assert 0.0 <= s["gold"]["dpo"] <= 1.0 and s["gold"]["prompts"] == 8
    assert (tmp_path / "demo" / "dpo" / "config.json").exists() and not (tmp_path / "demo" / "rm").exists()
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["gold"]["dpo"] == s["gold"]["dpo"]
