"""The colossalai strategies on the micro llama, against our own ddp.

On CPU: `colossalai_ddp` (TorchDDPPlugin) and `colossalai_hybrid` (HybridParallelPlugin, tp = pp = 1)
go through the same Booster code as ZeRO-2 / Gemini: boost, booster.backward, no_sync, the
plugin's step (hybrid clips inside it), state dicts, checkpoints. Two trainers run as Ray actors;
single-trainer runs are in this process. The `gpu` tests run ZeRO-2 and Gemini on one GPU.

Run in the colossalai environment (`scripts/setup_colossalai.sh`); skipped where colossalai is
not installed. (This directory is not called `colossalai`: without colossalai installed, pytest's
`tests/` on sys.path would make it a namespace package of that name.)
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import helpers
import pytest
import torch
from helpers import max_diff, weights

pytest.importorskip("colossalai.booster")

from coati_ray.config import (
    ModelArgs,
    SFTDataArgs,
    TrainArgs,
)
from coati_ray.errors import ConfigError

BOOSTERS = ["colossalai_ddp", "colossalai_hybrid"]
# Same data, seed and global batch: the booster strategies compute the same update as ddp up to
# float32 reduction order (hybrid computes the clipping norm in float64): losses agree to 1e-5
# relative. Measured: colossalai_ddp is bit-identical to ddp; hybrid differs by <= 1e-7 relative.
LOSS_RTOL = 1e-5
# A resumed run repeats the uninterrupted one exactly on CPU; in-process runs use the GPU where
# there is one (gpu_check.sh runs this file there too), whose kernels may sum in another order.
EXACT = 1e-5 if torch.cuda.is_available() else 1e-6


def train(tmp_path, name, strategy, accumulation=2, **kw):
    return helpers.train(tmp_path, name, strategy=strategy, accumulation=accumulation, **kw)


def losses(run) -> list[float]:
    return [h["train/loss"] for h in run.history]


def assert_same_training(a, b, init_path: str, rtol: float = LOSS_RTOL) -> None:
    assert losses(a) == pytest.approx(losses(b), rel=rtol)
    wa, wb, w0 = weights(a.save_path), weights(b.save_path), weights(init_path)
    moved = max_diff(wa, w0)
    assert moved > 1e-4  # training changed the weights
    assert max_diff(wa, wb) < 0.01 * moved, (max_diff(wa, wb), moved)


def local_group(tmp_path, strategy, **model_kw):
    """A single in-process trainer, set up for SFT on the micro preset."""
    from coati_ray.cluster.group import TrainerGroup
    from coati_ray.pipelines.supervised import make_job

    ta = TrainArgs(strategy=strategy, batch_size=4, max_steps=10, save_path=str(tmp_path / "out"), warmup_ratio=0.0)
    job = make_job("sft", ModelArgs(preset_size="micro", **model_kw), SFTDataArgs(max_samples=100), ta, None)
    group = TrainerGroup(1, local=True)
    try:
        group.setup(job)
    except BaseException:
        group.shutdown()
        raise
    return group


@contextlib.contextmanager
def after_two_steps(tmp_path, strategy, **model_kw):
    """A local trainer after two SFT steps: (group, worker, its full state dict, its optimizer's,
    the untrained model's state dict); shut down on exit."""
    group = local_group(tmp_path, strategy, **model_kw)
    worker = group.workers[0]
    try:
        for _ in range(2):
            group.train_step()
        sd, optim_sd = worker.strategy.state_dicts(worker.model, worker.optimizer)
        yield group, worker, sd, optim_sd, worker.build_model().state_dict()
    finally:
        group.shutdown()


# --- CPU: the booster path against ddp --------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_pair(ray_cluster, tmp_path_factory):
    """Two ddp trainers, 2 x 4 samples accumulated on each: the reference run."""
    return train(tmp_path_factory.mktemp("ddp"), "ddp", "ddp", trainers=2)


@pytest.mark.parametrize("strategy", BOOSTERS)
def test_two_booster_trainers_learn_exactly_what_ddp_learns(ddp_pair, tmp_path, micro_model, strategy):
    run = train(tmp_path, strategy, strategy, trainers=2)
    first, last = losses(run)[0], losses(run)[-1]
    assert last < first - 0.3, losses(run)  # ~6.9 -> ~6.4 in 6 steps
    # same losses and weights (accumulation went through booster.no_sync, clipping through the plugin)
    assert_same_training(run, ddp_pair, micro_model)
    for a, b in zip(run.history, ddp_pair.history, strict=True):
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-5)
        assert a["train/lr"] == pytest.approx(b["train/lr"], rel=1e-12)  # the scheduler drives the plugin's optimizer
    assert run.final_eval["eval/loss"] == pytest.approx(ddp_pair.final_eval["eval/loss"], rel=LOSS_RTOL)


@pytest.mark.parametrize("strategy", BOOSTERS)
def test_resumed_run_continues_exactly(tmp_path, strategy):
    straight = train(tmp_path, "straight", strategy, local=True)
    part = train(tmp_path, "resumed", strategy, local=True, ckpt_interval=3)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_6")  # keep only the step-3 checkpoint
    resumed = train(tmp_path, "resumed", strategy, local=True, resume=True)  # a fresh trainer
    assert resumed.start_step == 3 and len(resumed.history) == 3
    assert losses(resumed) == pytest.approx(losses(straight)[3:], rel=EXACT)  # optimizer state came back too
    assert max_diff(weights(straight.save_path), weights(resumed.save_path)) < EXACT
    assert losses(part) == pytest.approx(losses(straight), rel=EXACT)


@pytest.mark.parametrize("strategy", BOOSTERS)
def test_full_state_dict_has_hf_names_and_the_trained_weights(tmp_path, strategy):
    from transformers import AutoModelForCausalLM

    with after_two_steps(tmp_path, strategy) as (group, worker, sd, optim_sd, fresh):
        assert sd.keys() == fresh.keys()  # HF names, no wrapper prefixes
        trained = dict(worker.strategy.unwrap(worker.model).named_parameters())
        for name, p in trained.items():
            assert sd[name].dtype == torch.float32 and sd[name].device.type == "cpu"
            assert torch.equal(sd[name], p.detach().cpu()), name
        assert not torch.equal(sd["lm_head.weight"], fresh["lm_head.weight"])  # these are trained weights
        assert len(optim_sd["state"]) == len(trained)  # Adam moments of every trained parameter
        group.train_step()
        assert not torch.equal(sd["lm_head.weight"], trained["lm_head.weight"].detach())  # the export is a copy
        group.save_model(str(tmp_path / "hf"))
        sd, _ = worker.strategy.state_dicts(worker.model, None)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))  # plain transformers reads it
    assert max_diff(hf.state_dict(), sd) == 0.0


def test_lora_with_colossalai_ddp_trains_and_saves_only_the_adapter(tmp_path):
    from coati_ray.models.loading import load_causal_lm

    group = local_group(tmp_path, "colossalai_ddp", lora_rank=4, lora_target_modules="q_proj,v_proj")
    worker = group.workers[0]
    try:
        inner = worker.strategy.unwrap(worker.model)
        before = {n: p.detach().clone() for n, p in inner.named_parameters()}
        for _ in range(3):
            group.train_step()
        changed = {n for n, p in inner.named_parameters() if not torch.equal(before[n], p)}
        assert changed and all("lora_" in n for n in changed)
        assert any("lora_B" in n for n in changed)  # B starts at zero
        group.save_model(str(tmp_path / "lora"))
    finally:
        group.shutdown()
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    assert any("lora_" in n for n, _ in load_causal_lm(str(tmp_path / "lora")).named_parameters())


def test_hybrid_refuses_lora_with_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="colossalai_hybrid does not train LoRA"):
        local_group(tmp_path, "colossalai_hybrid", lora_rank=4)


@pytest.mark.parametrize("name", ["colossalai_zero2", "colossalai_gemini"])
def test_zero2_and_gemini_without_cuda_name_the_cpu_alternatives(name):
    from coati_ray.engines.strategy import make_strategy

    with pytest.raises(ConfigError, match=rf"--strategy: {name} needs a CUDA GPU") as e:
        make_strategy(name, torch.device("cpu"))
    assert "colossalai_ddp" in str(e.value) and "colossalai_hybrid" in str(e.value)


def test_ppo_policy_and_critic_on_the_hybrid_booster_match_ddp(ray_cluster, micro_model, tmp_path):
    """Policy and critic both on colossalai_hybrid, whose plugin clips inside its step (as ZeRO-2 and
    Gemini do); the generator scores with plain transformers on the weights rank 0 published."""
    from coati_ray.models.loading import load_value_model
    from coati_ray.pipelines.ppo import run_ppo
    from coati_ray.ppo_config import PPOConfig

    rm = train(tmp_path, "rm", "ddp", stage="rm", local=True, accumulation=1, batch_size=8, max_steps=2)

    def ppo(strategy):
        cfg = PPOConfig.of(pretrain=micro_model, rm_path=rm.save_path, strategy=strategy, experience_batch_size=8,
                           train_batch_size=4, max_new_tokens=8, max_steps=2, lr=1e-3, critic_lr=1e-3, ptx_coef=0.1,
                           sync_check_interval=1, save_path=str(tmp_path / strategy), actors=1, trainers=1)
        return run_ppo(cfg, progress=False)

    r, ref = ppo("colossalai_hybrid"), ppo("ddp")
    assert len(r.history) == len(ref.history) == 2
    for m, m_ref in zip(r.history, ref.history):
        # the generator's log-probs (HF forward on the published weights) == the trainer's
        assert m["sync/logprob_max_diff"] < 1e-4, m
        assert m["policy/grad_norm"] > 0 and m["value/grad_norm"] > 0  # the plugin reported the norms
        # step 2's samples come from step 1's published policy: equal rewards mean equal updates
        assert m["reward/mean"] == pytest.approx(m_ref["reward/mean"], rel=1e-5, abs=1e-6)
        for key in ("value/loss", "ptx/loss", "policy/grad_norm", "value/grad_norm"):
            assert m[key] == pytest.approx(m_ref[key], rel=1e-4), key
        assert m["policy/loss"] == pytest.approx(m_ref["policy/loss"], abs=1e-6)  # ~1e-3, a sum of +/- terms
    moved = max_diff(weights(ref.save_path), weights(micro_model))
    assert moved > 1e-4  # the policy moved ...
    assert max_diff(weights(r.save_path), weights(ref.save_path)) < 0.01 * moved  # ... as under ddp
    critic = {n: p.detach() for n, p in load_value_model(f"{r.save_path}/critic").named_parameters()}
    critic_ref = weights(f"{ref.save_path}/critic")
    critic_moved = max_diff(critic_ref, weights(rm.save_path))
    assert critic_moved > 1e-4  # the critic (initialised from the RM) moved, as under ddp
    assert max_diff(critic, critic_ref) < 0.01 * critic_moved


# --- GPU: ZeRO-2 and Gemini ---------------------------------------------------------------------------
# One GPU, one in-process trainer (a one-rank nccl group, as a single trainer gets). ZeRO-2 in fp32
# computes the update of ddp (clipping and accumulation inside the ZeRO optimizer): 1e-4. In bf16,
# ZeRO-2 and Gemini keep bf16 working weights (fp32 masters) where ddp autocasts fp32 weights: 2e-2.
GPU_CASES = [("colossalai_zero2", "fp32", 1e-4), ("colossalai_zero2", "bf16", 2e-2),
             ("colossalai_gemini", "bf16", 2e-2)]


@pytest.mark.gpu
@pytest.mark.parametrize("strategy,dtype,rtol", GPU_CASES)
def test_gpu_strategy_matches_ddp_resumes_and_exports(tmp_path, micro_model, strategy, dtype, rtol):
    from transformers import AutoModelForCausalLM

    model = ModelArgs(preset_size="micro", dtype=dtype)
    ddp = train(tmp_path, "ddp", "ddp", local=True, model=model)
    run = train(tmp_path, "run", strategy, local=True, model=model, ckpt_interval=3)
    assert losses(run)[-1] < losses(run)[0] - 0.3, losses(run)
    assert losses(run) == pytest.approx(losses(ddp), rel=rtol)
    assert run.final_eval["eval/loss"] == pytest.approx(ddp.final_eval["eval/loss"], rel=rtol)

    # export: an fp32 HF directory that transformers reads, holding what the trainer evaluated
    exported = weights(run.save_path)
    assert all(v.dtype == torch.float32 for v in exported.values())
    hf = AutoModelForCausalLM.from_pretrained(run.save_path)
    assert hf.state_dict().keys() == AutoModelForCausalLM.from_pretrained(micro_model).state_dict().keys()
    if dtype == "fp32":  # the same update as ddp (bf16 rounding can flip the step of a parameter with ~0 gradient)
        assert max_diff(weights(ddp.save_path), exported) < 0.01 * max_diff(exported, weights(micro_model))

    # resume from step 3 in a fresh trainer: ZeRO-2 restores its fp32 masters and Adam state exactly;
    # Gemini gathers and reloads its weights in bf16 (as colossalai's own checkpoints do)
    shutil.rmtree(Path(run.save_path) / "checkpoints" / "step_6")
    resumed = train(tmp_path, "run", strategy, local=True, model=model, resume=True)
    assert resumed.start_step == 3
    tol = 1e-4 if strategy == "colossalai_zero2" else 1e-2
    assert losses(resumed) == pytest.approx(losses(run)[3:], rel=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["colossalai_zero2", "colossalai_gemini"])
def test_gpu_full_state_dict_has_hf_names_and_fp32_values(tmp_path, strategy):
    with after_two_steps(tmp_path, strategy, dtype="bf16") as (_, worker, sd, optim_sd, fresh):
        assert sd.keys() == fresh.keys()
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
        assert not torch.equal(sd["lm_head.weight"], fresh["lm_head.weight"])
        assert optim_sd["state"]  # the gathered Adam state
        # the working (bf16) weights are the exported ones, rounded
        if strategy == "colossalai_zero2":
            for name, p in worker.strategy.unwrap(worker.model).named_parameters():
                assert torch.equal(sd[name].to(p.dtype), p.detach().cpu()), name


def test_dpo_on_two_colossalai_ddp_trainers_matches_ddp(ray_cluster, tmp_path):
    """The preference trainer on the booster path: the reference pass runs before the plugin wraps the model."""
    import math

    from coati_ray.config import ClusterArgs, PreferenceArgs, PreferenceDataArgs
    from coati_ray.pipelines.supervised import run_training

    def dpo(strategy):
        ta = TrainArgs(strategy=strategy, batch_size=4, max_steps=4, lr=1e-3, save_path=str(tmp_path / strategy),
                       log_interval=1000, warmup_ratio=0.0)
        return run_training("dpo", ModelArgs(preset_size="micro"), PreferenceDataArgs(max_samples=64), ta,
                            ClusterArgs(trainers=2), pref=PreferenceArgs(), progress=False)

    booster, ddp = dpo("colossalai_ddp"), dpo("ddp")
    assert losses(booster)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses(booster) == pytest.approx(losses(ddp), rel=LOSS_RTOL)
