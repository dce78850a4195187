"""Stages 1 and 2 on a real local Ray cluster with the micro llama preset on the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import max_diff, train, weights

from coati_ray.config import ModelArgs, PairDataArgs, SFTDataArgs, TrainArgs
from coati_ray.errors import DataError
from coati_ray.models.loading import load_causal_lm, load_value_model


def assert_same_training(a, b, init_path: str) -> None:
    """Two runs that should be the same update, up to float32 reduction order.

    Losses agree to 1e-5 (relative). Parameters agree to 1% of the largest change any parameter
    made during training: Adam divides by sqrt(v), so a gradient that differs in its 7th digit
    can move a parameter whose gradient is ~0 by a visible fraction of a step.
    """
    for x, y in zip(a.history, b.history, strict=True):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5, abs=1e-6)
    wa, wb, w0 = weights(a.save_path), weights(b.save_path), weights(init_path)
    moved = max_diff(wa, w0)
    assert moved > 1e-4  # training did change the weights
    assert max_diff(wa, wb) < 0.01 * moved, (max_diff(wa, wb), moved)


@pytest.fixture(scope="module")
def sft_run(ray_cluster, tmp_path_factory):
    """SFT of the micro preset on the demo's 4000 single-turn rows (the dialogues after them, ~3x longer, are
    trained in test_preference_training.py): 4 epochs, 1000 steps (about a minute)."""
    return train(tmp_path_factory.mktemp("sft"), "sft", batch_size=16, max_steps=None, max_epochs=4, lr=3e-3,
                 data=SFTDataArgs(max_samples=4000))


def test_sft_loss_falls_well_below_its_start_and_the_policy_does_the_arithmetic(sft_run):
    from coati_ray.defaults import demo_file
    from coati_ray.evaluation.gold import evaluate_gold
    from coati_ray.models.loading import load_tokenizer

    first, last = sft_run.history[0]["train/loss"], sft_run.final_eval["eval/loss"]
    assert len(sft_run.history) == sft_run.setup.total_steps == 1000
    assert last < 0.1 * first, (first, last)  # from ~ln(vocab) = 7 to well under 0.7
    model = load_causal_lm(sft_run.save_path)  # the result is a loadable HF directory
    prompts = [json.loads(l)["prompt"] for l in open(demo_file("prompts_eval.jsonl"), encoding="utf-8")][:64]
    gold = evaluate_gold(model, load_tokenizer(sft_run.save_path), prompts)
    # the arithmetic is learnt; half the demonstrations omit the graded final sentence, so the
    # gold score itself is PPO's job (an untrained model scores 0 on both)
    assert gold.arithmetic >= 0.5, gold.examples
    summary = json.loads(open(f"{sft_run.save_path}/train_summary.json").read())
    assert summary["steps"] == 1000
    events = (Path(sft_run.save_path) / "tensorboard").iterdir()
    assert any(p.name.startswith("events.out.tfevents") for p in events)


def test_reward_model_from_sft_reaches_held_out_accuracy_0_8(sft_run, tmp_path):
    # ColossalChat's order: the RM starts from the SFT model, which already knows the arithmetic.
    # the 3000 single-turn pairs: the micro model (0.2M parameters) reaches 0.77 with the 300 dialogue pairs added
    r = train(tmp_path, "rm", stage="rm", batch_size=16, max_steps=None, max_epochs=2, lr=1e-3,
              model=ModelArgs(pretrain=sft_run.save_path), data=PairDataArgs(max_samples=3000))
    assert r.final_eval["eval/accuracy"] >= 0.8, r.evals
    assert r.final_eval["eval/margin"] > 0
    rm = load_value_model(r.save_path)
    assert rm.config.num_labels == 1


def test_two_ddp_trainers_match_one_trainer_with_twice_the_accumulation(ray_cluster, tmp_path, micro_model):
    two = train(tmp_path, "two", trainers=2, batch_size=4, accumulation=1)
    one = train(tmp_path, "one", trainers=1, batch_size=4, accumulation=2, local=True)
    # Same samples per step, loss normalised by the global token count: equal up to float32
    # reduction order (gloo's all-reduce vs. sequential accumulation).
    assert_same_training(two, one, micro_model)


def test_accumulation_gives_the_full_batch_gradient(tmp_path, micro_model):
    # 2 x 4 accumulated == 1 x 8: the per-token normalisation over the whole step, not per micro-batch.
    acc = train(tmp_path, "acc", batch_size=4, accumulation=2, local=True)
    full = train(tmp_path, "full", batch_size=8, accumulation=1, local=True)
    assert_same_training(acc, full, micro_model)


def test_fsdp_matches_ddp(ray_cluster, tmp_path, micro_model):
    ddp = train(tmp_path, "ddp", trainers=2, strategy="ddp")
    fsdp = train(tmp_path, "fsdp", trainers=2, strategy="fsdp")
    for a, b in zip(ddp.history, fsdp.history):
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
    assert_same_training(ddp, fsdp, micro_model)


def test_fsdp_reward_model_with_lora_saves_merged(ray_cluster, tmp_path):
    r = train(tmp_path, "rm_lora", stage="rm", trainers=2, strategy="fsdp", batch_size=8, max_steps=4,
              model=ModelArgs(preset_size="micro", lora_rank=4, merge_lora=True))
    assert r.setup.trainable_params < r.setup.params / 2
    rm = load_value_model(r.save_path)  # merged: a plain HF model, no adapter files needed
    assert not any("lora" in n for n, _ in rm.named_parameters())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_continues_exactly(ray_cluster, tmp_path, strategy):
    straight = train(tmp_path, "straight", trainers=2, max_steps=6, strategy=strategy)
    part = train(tmp_path, "resumed", trainers=2, max_steps=6, ckpt_interval=3, strategy=strategy)
    # Throw away the finished run's end state, keep the step-3 checkpoint, and resume from it.
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_6")
    resumed = train(tmp_path, "resumed", trainers=2, max_steps=6, resume=True, strategy=strategy)
    assert resumed.start_step == 3 and len(resumed.history) == 3
    assert [h["train/loss"] for h in resumed.history] == pytest.approx([h["train/loss"] for h in straight.history[3:]],
                                                                       rel=1e-6)
    assert max_diff(weights(straight.save_path), weights(resumed.save_path)) < 1e-6
    assert part.history[-1]["train/loss"] == pytest.approx(straight.history[-1]["train/loss"], rel=1e-6)


@pytest.mark.parametrize("strategy,write,read", [("ddp", 2, 1), ("fsdp", 2, 1), ("fsdp", 1, 2)])
def test_a_checkpoint_loads_under_another_world_size(ray_cluster, tmp_path, strategy, write, read):
    """Sharded (torch.distributed.checkpoint) checkpoints: each rank writes its part; a group of
    another size reads them back into the same full model and optimizer state, exactly."""
    from coati_ray.cluster.group import TrainerGroup
    from coati_ray.pipelines.supervised import make_job

    def group_of(n: int, name: str):
        ta = TrainArgs(strategy=strategy, batch_size=4, max_steps=4, save_path=str(tmp_path / name),
                       warmup_ratio=0.0)
        g = TrainerGroup(n, 1.0, 0.0)
        g.setup(make_job("sft", ModelArgs(preset_size="micro"), SFTDataArgs(max_samples=64), ta, None))
        return g

    writer = group_of(write, "w")
    try:
        for _ in range(2):
            writer.train_step()
        ckpt = tmp_path / "ckpt"
        writer.save_checkpoint(str(ckpt), {})
        saved = writer.full_state()
    finally:
        writer.shutdown()
    files = sorted(p.name for p in (ckpt / "shards").iterdir())
    assert files == [".metadata"] + [f"__{r}_0.distcp" for r in range(write)], files  # one file per rank
    assert not (ckpt / "state.pt").exists() and not Path(str(ckpt) + ".tmp").exists()
    reader = group_of(read, "r")
    try:
        meta = reader.load_checkpoint(str(ckpt))
        loaded = reader.full_state()
    finally:
        reader.shutdown()
    assert meta["step"] == 2 and meta["world_size"] == write and meta["layout"] == "dcp"
    model_a, optim_a = saved
    model_b, optim_b = loaded
    assert max_diff(model_a, model_b) == 0.0
    state_a, state_b = optim_a["state"], optim_b["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) == len(model_a)
    for name in state_a:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[name][k], state_b[name][k]), (name, k)
    assert any(state_a[n]["exp_avg"].abs().sum() > 0 for n in state_a)  # two real steps are in it


def test_lora_trains_only_adapter_parameters(tmp_path):
    from coati_ray.cluster.group import TrainerGroup
    from coati_ray.pipelines.supervised import make_job

    ta = TrainArgs(batch_size=4, max_steps=3, save_path=str(tmp_path / "lora"), warmup_ratio=0.0)
    job = make_job("sft", ModelArgs(preset_size="micro", lora_rank=4, lora_target_modules="q_proj,v_proj"),
                   SFTDataArgs(max_samples=100), ta, None)
    group = TrainerGroup(1, local=True)
    worker = group.workers[0]
    try:
        info = group.setup(job)
        before = {n: p.detach().clone() for n, p in worker.model.named_parameters()}
        for _ in range(3):
            group.train_step()
        after = dict(worker.model.named_parameters())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        trainable = {n for n, p in after.items() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        assert changed and changed <= trainable  # every changed tensor is an adapter tensor
        assert any("lora_B" in n for n in changed)  # B starts at zero, so it must have moved
        assert info.trainable_params < 0.2 * info.params
        group.save_model(ta.save_path)  # not merged: an adapter directory
    finally:
        group.shutdown()
    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert "adapter_config.json" in files and "model.safetensors" not in files
    reloaded = load_causal_lm(ta.save_path)  # base + adapter
    assert any("lora_" in n for n, _ in reloaded.named_parameters())


def test_bad_data_inside_an_actor_reaches_the_driver_as_the_same_clear_error(ray_cluster, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        train(tmp_path, "bad", data=SFTDataArgs(dataset=str(bad), eval_split=0.0))
    assert f"{bad}, line 2, row 1, field 'output'" in str(e.value)


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom"])
def test_every_seed_family_trains_and_saves(tmp_path, family):
    r = train(tmp_path, family, local=True, max_steps=3, model=ModelArgs(model=family, preset_size="micro"))
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in r.history)
    assert load_causal_lm(r.save_path, family).config.model_type == family


def test_bf16_autocast_trains(tmp_path):
    r = train(tmp_path, "bf16", local=True, max_steps=30, batch_size=16, lr=3e-3,
              model=ModelArgs(preset_size="micro", dtype="bf16"))
    assert r.history[-1]["train/loss"] < r.history[0]["train/loss"] - 1.0
    assert weights(r.save_path)["lm_head.weight"].dtype == torch.float32  # fp32 masters


@pytest.mark.timeout(300, method="signal")  # a hang fails the test instead of holding the suite
@pytest.mark.parametrize("stage", ["sft", "rm"])
@pytest.mark.parametrize("eval_split", [0.05, 0.0])  # 24 rows: 1 eval row (fewer than the ranks), and none
def test_two_trainers_finish_when_the_eval_set_is_smaller_than_the_world(ray_cluster, tmp_path, demo_dir, stage,
                                                                         eval_split):
    """The ranks meet in every collective whatever their eval shard (issue 15: a 1-row eval set hung
    the final evaluation of a 2-trainer run, one rank's forward pairing with the other's all-reduce)."""
    src = demo_dir / ("sft_eval.jsonl" if stage == "sft" else "rm_eval.jsonl")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(src.read_text().splitlines(keepends=True)[:24]))
    data_cls = SFTDataArgs if stage == "sft" else PairDataArgs
    model = None if stage == "sft" else ModelArgs(preset_size="micro")
    r = train(tmp_path, "out", stage=stage, trainers=2, batch_size=2, max_steps=3, model=model,
              data=data_cls(dataset=str(small), eval_split=eval_split))
    assert len(r.history) == 3
    if eval_split:
        assert r.final_eval["eval/loss"] > 0  # the one eval row was scored, once
    else:
        assert r.final_eval == {}  # nothing to evaluate: no metric rather than a made-up 0


KILLED_SAVER = """
import sys
from coati_ray.cluster.group import TrainerGroup
from coati_ray.config import ModelArgs, SFTDataArgs, TrainArgs
from coati_ray.pipelines.supervised import make_job
ta = TrainArgs(batch_size=2, max_steps=1000, save_path=sys.argv[1], warmup_ratio=0.0)
g = TrainerGroup(1, 1.0, 0.0, local=True)
g.setup(make_job("sft", ModelArgs(preset_size="tiny"), SFTDataArgs(max_samples=16, max_len=32), ta, None))
for step in range(1, 1000):  # save after every step until killed
    g.train_step()
    g.save_checkpoint(sys.argv[1] + f"/checkpoints/step_{step}", {})
    print("saved", step, flush=True)
"""


def test_a_save_killed_midway_is_never_resumed_from(tmp_path):
    """SIGKILL while a checkpoint is being written: --resume auto takes the last complete one, which
    loads, and the next save clears the unfinished one."""
    import signal
    import subprocess
    import sys
    import time

    from coati_ray.cluster.group import TrainerGroup
    from coati_ray.pipelines.supervised import make_job
    from coati_ray.run_dir import latest_checkpoint, prune_checkpoints

    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(save)], stdout=subprocess.PIPE, text=True)
    ckpts, deadline, caught = save / "checkpoints", time.monotonic() + 120, None
    try:
        assert proc.stdout.readline().split() == ["saved", "1"]  # one complete checkpoint first
        while caught is None and time.monotonic() < deadline and proc.poll() is None:
            # a save in progress that has written part of its shards
            caught = next((d for d in ckpts.glob("step_*.tmp") if any(d.glob("shards/*.distcp"))), None)
        assert caught is not None, "never saw a checkpoint being written within 120 s"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    caught_step = int(caught.name.removeprefix("step_").removesuffix(".tmp"))
    assert caught.exists() and not (caught / "trainer_state.json").exists()
    last = latest_checkpoint(str(save))
    assert last is not None and int(last.rsplit("_", 1)[1]) < caught_step
    g = TrainerGroup(1, 1.0, 0.0, local=True)
    try:
        ta = TrainArgs(batch_size=2, max_steps=1000, save_path=str(save), warmup_ratio=0.0)
        g.setup(make_job("sft", ModelArgs(preset_size="tiny"), SFTDataArgs(max_samples=16, max_len=32), ta, None))
        assert g.load_checkpoint(last)["step"] == int(last.rsplit("_", 1)[1])
    finally:
        g.shutdown()
    assert caught in prune_checkpoints(str(save), 2, "trainer_state.json") and not caught.exists()
